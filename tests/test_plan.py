"""`harmony-mcore plan`: exact parameter counts of the meta-built Megatron model, layout refusals, memory
verdicts, and the recipes in configs/recipes passing for their stated cluster."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from harmony_mcore.config import load_config
from harmony_mcore.plan import (
    ActivationModel,
    BatchShape,
    Hardware,
    PlanError,
    count_rank_params,
    main,
    make_plan,
    unpadded_total,
)
from harmony_mcore.weights.arch import ArchSpec
from harmony_mcore.weights.presets import PRESETS, PUBLISHED_TOTALS, PresetError, arch_for, preset_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs" / "recipes").glob("*.yaml"))
QWEN3_8B_1X8 = REPO / "configs" / "recipes" / "qwen3_8b_base_math500_1x8.yaml"


def preset_arch(name: str) -> ArchSpec:
    return ArchSpec.from_hf_config(preset_config(name))


def total(arch: ArchSpec, padded_vocab: int, tp: int, pp: int) -> tuple[int, int]:
    """(padded, unpadded) totals summed over every rank of the layout, duplicates counted once."""
    padded = sum(r.unique for r in count_rank_params(arch, padded_vocab, tp, pp))
    return padded, unpadded_total(arch, padded, padded_vocab)


def rank_params_by_hand(a: ArchSpec, vocab: int, tp: int, pp: int, pp_rank: int) -> int:
    """Megatron's parameters on one rank, by the arithmetic of the architecture (not by the builder)."""
    attention = (a.hidden_size * a.head_dim * (a.num_heads + 2 * a.num_query_groups)  # fused QKV
                 + a.num_heads * a.head_dim * a.hidden_size) // tp  # output projection
    mlp = 3 * a.hidden_size * a.ffn_hidden_size // tp  # gate, up, down
    replicated = 2 * a.hidden_size + 2 * a.head_dim * a.qk_norm  # two RMSNorms (+ q/k norms)
    n = a.num_layers // pp * (attention + mlp + replicated)
    first, last = pp_rank == 0, pp_rank == pp - 1
    vocab_rows = vocab // tp * a.hidden_size
    n += first * vocab_rows
    n += last * (a.hidden_size + vocab_rows * (not a.tied_embeddings or pp > 1))  # final norm, output layer
    return n


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOTALS))
@pytest.mark.parametrize("tp,pp", [(1, 1), (4, 2), (8, 4)])
def test_published_totals_exact(name, tp, pp):
    arch = preset_arch(name)
    padded_vocab = arch.padded_vocab_size(128)
    assert total(arch, padded_vocab, tp, pp) == (PUBLISHED_TOTALS[name], PUBLISHED_TOTALS[name])


def test_qwen3_8b_total_is_the_arithmetic_of_its_config():
    layer = 4096 * 4096 + 2 * 4096 * 1024 + 4096 * 4096 + 2 * 128 + 3 * 4096 * 12288 + 2 * 4096
    assert 151936 * 4096 * 2 + 36 * layer + 4096 == PUBLISHED_TOTALS["qwen3-8b"] == 8_190_735_360


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOTALS))
def test_padded_vocab_reported_apart_from_the_published_count(name):
    arch = preset_arch(name)
    padded_vocab = arch.padded_vocab_size(1024)
    assert padded_vocab > arch.vocab_size  # neither vocab is a multiple of 1024
    padded, unpadded = total(arch, padded_vocab, 2, 1)
    assert unpadded == PUBLISHED_TOTALS[name]
    # untied: the embedding and the output layer both carry the padding rows
    assert padded - unpadded == (padded_vocab - arch.vocab_size) * arch.hidden_size * 2


@pytest.mark.parametrize("name,tp,pp", [("qwen3-8b", 4, 2), ("llama3.1-8b", 2, 4), ("qwen3-4b", 2, 3),
                                        ("qwen3-1.7b", 1, 2)])
def test_every_rank_matches_the_arithmetic(name, tp, pp):
    arch = preset_arch(name)
    vocab = arch.padded_vocab_size(128)
    ranks = count_rank_params(arch, vocab, tp, pp)
    assert [(r.tp_rank, r.pp_rank) for r in ranks] == [(t, p) for p in range(pp) for t in range(tp)]
    for r in ranks:
        assert r.params == rank_params_by_hand(arch, vocab, tp, pp, r.pp_rank), (r.tp_rank, r.pp_rank)
        assert (r.first_layer, r.num_layers) == (r.pp_rank * arch.num_layers // pp, arch.num_layers // pp)
        assert r.tied_copy == (arch.tied_embeddings and pp > 1 and r.pp_rank == pp - 1)


def test_tied_copy_on_the_last_stage_is_counted_once_in_the_total():
    arch = preset_arch("qwen3-4b")
    ranks = count_rank_params(arch, arch.padded_vocab_size(128), 2, 3)
    last = [r for r in ranks if r.pp_rank == 2]
    assert all(r.tied_copy and r.output and r.params - r.unique >= 151936 // 2 * 2560 for r in last)
    assert total(arch, arch.padded_vocab_size(128), 2, 3)[1] == 4_022_468_096


def test_presets_agree_with_transformers():
    """The Hugging Face model of every preset, built on the meta device, has Megatron's unpadded total."""
    transformers = pytest.importorskip("transformers")
    for name, cfg in PRESETS.items():
        hf_config = transformers.AutoConfig.for_model(**cfg)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(hf_config)
        arch = preset_arch(name)
        hf_total = sum(p.numel() for p in model.parameters())
        assert total(arch, arch.padded_vocab_size(128), 1, 1)[1] == hf_total, name


def test_activation_terms_by_hand():
    """Qwen3-8B, TP 4, one 4096-token sequence: T*(10h + (2d(2a + 2g') + 2d(a + g) + 6F)/t) [+ 5as^2b/t]."""
    arch = preset_arch("qwen3-8b")
    shape = BatchShape(seq_len=4096, micro_batch=1, sequences_per_update=8, tokens=4096, packed=False)
    per_token = 10 * 4096 + (2 * 128 * (64 + 16) + 2 * 128 * 40 + 6 * 12288) // 4
    assert ActivationModel(arch, 4, 151936, shape, attention="te", recompute=False).layer() == 4096 * per_token
    expanded = 10 * 4096 + (2 * 128 * 128 + 2 * 128 * 40 + 6 * 12288) // 4  # K and V expanded to 32 heads
    assert ActivationModel(arch, 4, 151936, shape, attention="sdpa", recompute=False).layer() == 4096 * expanded
    unfused = ActivationModel(arch, 4, 151936, shape, attention="unfused", recompute=False).layer()
    assert unfused == 4096 * expanded + 5 * 32 * 4096**2 // 4


def test_packed_activations_scale_with_the_token_budget():
    """A packed micro-batch of T tokens keeps T/s times what one s-token sequence keeps (fused attention)."""
    arch = preset_arch("qwen3-8b")
    one = BatchShape(seq_len=4096, micro_batch=1, sequences_per_update=8, tokens=4096, packed=False)
    packed = BatchShape(seq_len=4096, micro_batch=1, sequences_per_update=8, tokens=16384, packed=True)
    layer = [ActivationModel(arch, 4, 151936, shape, attention="te", recompute=False).layer()
             for shape in (one, packed)]
    assert layer[1] == 4 * layer[0]


def recipe_cluster(path: Path) -> list[str]:
    nodes, gpus = re.search(r"_(\d+)x(\d+)\.yaml$", path.name).groups()
    return ["--nodes", nodes, "--gpus-per-node", gpus, "--gpu-mem-gib", "80"]


def test_eight_recipes_exist():
    names = {p.stem for p in RECIPES}
    for model in ("qwen3_1p7b_base", "qwen3_4b_base", "qwen3_8b_base", "llama31_8b_instruct"):
        assert {f"{model}_math500_1x8", f"{model}_math500_2x8"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_has_published_settings_and_fits(path, capsys):
    cfg = load_config(path)
    assert cfg.model.preset and cfg.model.hf_path and not Path(cfg.model.hf_path, "config.json").exists()
    assert (cfg.model.dtype, cfg.model.layer_spec) == ("bfloat16", "auto")
    assert (cfg.train.questions_per_step, cfg.rollout.n_per_view, cfg.grpo.updates_per_step) == (128, 16, 1)
    assert (cfg.optim.lr, cfg.optim.decay, cfg.optim.warmup_ratio) == (3e-6, "cosine", 0.1)
    assert (cfg.grpo.kl_coef, cfg.grpo.kl_type, cfg.grpo.entropy_coef) == (0.005, "k3", 0.0)
    r = cfg.rollout
    assert (r.max_prompt_tokens, r.max_response_tokens, r.temperature, r.top_p) == (1024, 3072, 1.0, 1.0)
    assert (cfg.eval.k, cfg.eval.temperature, cfg.eval.top_p, cfg.eval.every) == (16, 0.8, 0.95, 10)
    assert cfg.train.epochs == 100
    assert cfg.rollout.prompt_style == ("chat" if "instruct" in path.stem else "base")
    assert path.read_text().startswith("#") and "TP" in path.read_text().split("model:")[0]
    assert main(["--config", str(path), *recipe_cluster(path)]) == 0
    out = capsys.readouterr().out
    assert "VERDICT: FITS" in out
    stated = re.search(r"Planner: peak ([0-9.]+) GiB", path.read_text()).group(1)  # the comment stays true
    assert f"VERDICT: FITS: peak {stated} GiB" in out
    assert not torch.distributed.is_initialized()  # the simulated world is torn down


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["--config", str(QWEN3_8B_1X8), *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("args,reason", [
    (["--nodes", "2", "--gpus-per-node", "8", "parallel.tp=16", "parallel.dp=1", "rollout.engines=8"],
     "parallel.tp=16 does not divide the 8 query groups (KV heads)"),
    (["--nodes", "1", "--gpus-per-node", "8", "parallel.tp=1", "parallel.pp=8", "parallel.dp=1",
      "rollout.engines=8", "rollout.engine_tp=1"], "parallel.pp=8 does not divide the 36 layers"),
    (["--nodes", "2", "--gpus-per-node", "8"], "the cluster has 2 node(s) x 8 GPUs = 16"),
    (["--nodes", "1", "--gpus-per-node", "8", "rollout.engines=2"],
     "rollout.engines x engine_tp = 2 x 2 = 4 GPUs must equal the 8 training GPUs"),
    (["--nodes", "1", "--gpus-per-node", "8", "parallel.tp=2", "parallel.pp=4", "parallel.dp=1",
      "parallel.micro_batch_size=2048", "parallel.micro_batching=fixed"],
     "leaves 2 micro-batches per update, fewer than the parallel.pp=4"),
    (["--nodes", "1", "--gpus-per-node", "8", "rollout.max_response_tokens=40000"],
     "exceeds the model's 32768"),
])
def test_impossible_layouts_are_refused_with_the_reason(capsys, args, reason):
    code, text = run_cli(capsys, *args)
    assert code == 2
    assert "impossible layout" in text and reason in text


def test_bad_config_key_is_a_config_error(capsys):
    code, text = run_cli(capsys, "--nodes", "1", "--gpus-per-node", "8", "parallel.tpp=2")
    assert code == 2 and "parallel.tpp" in text


def test_training_state_too_large_does_not_fit(capsys):
    """Qwen3-8B without model parallelism: weights + fp32 grads + reference alone are 8 B/param = 61 GiB."""
    code, text = run_cli(capsys, "--nodes", "1", "--gpus-per-node", "8", "parallel.tp=1", "parallel.dp=8",
                         "rollout.engines=8", "rollout.engine_tp=1")
    assert code == 1
    assert "VERDICT: DOES NOT FIT" in text and "> 80 GiB" in text


def test_kv_cache_too_small_does_not_fit(capsys):
    """A TP-1 engine of Qwen3-8B (15 GiB of weights) in 15% of 80 GiB has no room for a KV cache."""
    code, text = run_cli(capsys, "--nodes", "1", "--gpus-per-node", "8", "rollout.engines=8",
                         "rollout.engine_tp=1", "rollout.gpu_memory_utilization=0.15")
    assert code == 1 and "cannot hold one 4096-token sequence" in text


def test_smaller_gpus_do_not_fit(capsys):
    code, text = run_cli(capsys, "--nodes", "1", "--gpus-per-node", "8", "--gpu-mem-gib", "40")
    assert code == 1 and "> 40 GiB" in text


def test_sleep_mode_takes_the_max_of_the_phases_and_awake_the_sum():
    cluster = Hardware(1, 8, 80.0)
    asleep = make_plan(load_config(QWEN3_8B_1X8), cluster).ranks[0]
    awake = make_plan(load_config(QWEN3_8B_1X8, ["rollout.sleep_while_training=false"]), cluster)
    assert asleep.phases.peak == max(asleep.phases.train, asleep.phases.rollout)
    assert awake.ranks[0].phases.train == asleep.memory.peak + awake.vllm.reservation
    assert awake.ranks[0].phases.peak > asleep.phases.peak


def test_disaggregated_pools(capsys):
    code, text = run_cli(capsys, "--nodes", "2", "--gpus-per-node", "8", "rollout.placement=disaggregated",
                         "rollout.engines=4", "rollout.gpu_memory_utilization=0.9")
    assert code == 0 and "vLLM GPU" in text
    plan = make_plan(load_config(QWEN3_8B_1X8, ["rollout.placement=disaggregated", "rollout.engines=4"]),
                     Hardware(2, 8))
    assert plan.ranks[0].phases.rollout == 0 and plan.ranks[0].phases.peak == plan.ranks[0].memory.peak


def test_arch_prefers_hf_config_json_and_names_preset_when_missing(tmp_path):
    cfg = load_config(QWEN3_8B_1X8)
    assert arch_for(cfg.model) == preset_arch("qwen3-8b")
    hf = dict(preset_config("qwen3-8b"), num_hidden_layers=2)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg.model.hf_path = str(tmp_path)
    assert arch_for(cfg.model).num_layers == 2
    cfg.model.hf_path, cfg.model.preset = str(tmp_path / "absent"), ""
    with pytest.raises(PresetError, match=r"^model\.preset: .*has no config.json"):
        arch_for(cfg.model)
    cfg.model.preset = "qwen3-9b"
    with pytest.raises(PlanError, match=r"model\.preset: unknown preset 'qwen3-9b'"):
        make_plan(cfg, Hardware(1, 8))
