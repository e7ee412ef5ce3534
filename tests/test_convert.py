"""HF <-> mcore conversion: bit-exact round trips at every layout, resharding, logits parity, bad inputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harmony_mcore.dist import spawn_gloo
from harmony_mcore.mcore import checkpoint
from harmony_mcore.mcore.convert import (
    hf_to_mcore_worker,
    mcore_to_hf_worker,
    parity_worker,
    preflight_hf_to_mcore,
    preflight_mcore_to_hf,
)
from harmony_mcore.mcore.parallel import LayoutError
from harmony_mcore.weights.arch import ArchError, ArchSpec
from harmony_mcore.weights.hf_dir import HFWeights
from harmony_mcore.weights.validate import WeightMismatchError

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
REPO = Path(__file__).resolve().parents[1]


def _all_layouts(rank: int, world: int, models: dict[str, str], out: str) -> dict:
    """In one 4-rank group (spare ranks are data-parallel replicas): convert each model at each layout, export
    each checkpoint at the reversed layout (so every checkpoint is resharded on the way out), and measure logits
    parity at TP=2, PP=2 and TP=2 x PP=2. Grouped by layout so Megatron's groups are built once per layout."""
    exported_layout = dict(zip(LAYOUTS, reversed(LAYOUTS)))
    parity: dict[str, float] = {}
    for tp, pp in LAYOUTS:
        for name, hf in models.items():
            hf_to_mcore_worker(rank, world, hf, f"{out}/{name}_mc_{tp}{pp}", tp, pp, None, 128)
    for tp, pp in LAYOUTS:
        for name, hf in models.items():
            src = next(layout for layout, target in exported_layout.items() if target == (tp, pp))
            mcore_to_hf_worker(rank, world, f"{out}/{name}_mc_{src[0]}{src[1]}",
                               f"{out}/{name}_hf_{src[0]}{src[1]}_via_{tp}{pp}", tp, pp, 1 << 30)
            if (tp, pp) != (1, 1):
                diff = parity_worker(rank, world, hf, f"{out}/{name}_mc_11", tp, pp, 2, 24, 0)
                if diff is not None:
                    parity[f"{name}@tp{tp}pp{pp}"] = diff
    return parity


@pytest.fixture(scope="module")
def converted(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    results = spawn_gloo(4, _all_layouts, {k: str(v) for k, v in tiny_models.items()}, str(out), timeout=1200)
    parity: dict[str, float] = {}
    for r in results:
        for k, v in r.items():
            parity[k] = max(v, parity.get(k, 0.0))
    return out, parity


def _assert_bit_exact(a_dir: Path, b_dir: Path) -> None:
    a, b = HFWeights(a_dir), HFWeights(b_dir)
    assert a.names() == b.names()
    for name in sorted(a.names()):
        x, y = a.get(name), b.get(name)
        assert x.dtype == y.dtype and torch.equal(x, y), f"{name} differs after the round trip"


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"tp{l[0]}pp{l[1]}")
def test_round_trip_bit_exact(converted, tiny_models, layout):
    out, _ = converted
    tp, pp = layout
    etp, epp = dict(zip(LAYOUTS, reversed(LAYOUTS)))[layout]
    for name, hf in tiny_models.items():
        exported = out / f"{name}_hf_{tp}{pp}_via_{etp}{epp}"
        _assert_bit_exact(hf, exported)
        assert json.loads((exported / "config.json").read_text())["vocab_size"] == 1000  # padding dropped


def test_resharding_tp1pp1_to_tp2pp2_and_back(converted, tiny_models):
    out, _ = converted
    for name, hf in tiny_models.items():
        _assert_bit_exact(hf, out / f"{name}_hf_11_via_22")  # converted at TP1 PP1, loaded at TP2 PP2
        _assert_bit_exact(hf, out / f"{name}_hf_22_via_11")  # and back


def test_checkpoint_is_padded_and_described(converted):
    out, _ = converted
    meta = checkpoint.read_meta(out / "qwen3_tied_mc_22")
    assert meta.padded_vocab_size == 1024 and meta.arch.vocab_size == 1000 and meta.arch.tied_embeddings
    assert (out / "qwen3_tied_mc_22" / "hf" / "tokenizer.json").is_file()


def test_logits_parity_megatron_vs_transformers(converted, tiny_models):
    _, parity = converted
    expected = {f"{name}@tp{tp}pp{pp}" for name in tiny_models for tp, pp in LAYOUTS[1:]}
    assert set(parity) == expected
    worst = max(parity, key=parity.get)
    assert parity[worst] <= 1e-4, f"{worst}: max |logits diff| {parity[worst]:.2e}"


def test_exported_model_loads_in_transformers(converted, tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = converted
    exported = out / "llama_untied_hf_22_via_11"
    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    ids = AutoTokenizer.from_pretrained(exported)("Tom has 7 apples.", return_tensors="pt").input_ids
    ref = AutoModelForCausalLM.from_pretrained(tiny_models["llama_untied"], dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


# --- bad inputs: each fails before any worker starts, naming what is wrong ---------------------------------------

def _edited_copy(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config_changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("change,error,needle", [
    ({"num_attention_heads": 2}, WeightMismatchError, "q_proj.weight"),
    ({"num_hidden_layers": 3}, WeightMismatchError, "model.layers.2."),
    ({"vocab_size": 1200}, WeightMismatchError, "model.embed_tokens.weight"),
    ({"tie_word_embeddings": True}, WeightMismatchError, "lm_head.weight"),
    ({"model_type": "gpt2"}, ArchError, "unknown architecture 'gpt2'"),
    ({"hidden_act": "gelu"}, ArchError, "config.hidden_act"),
], ids=["heads", "layers", "vocab", "tied", "arch", "activation"])
def test_mismatched_checkpoint_is_refused(tiny_qwen3, tmp_path, change, error, needle):
    bad = _edited_copy(tiny_qwen3, tmp_path / "bad", **change)
    with pytest.raises(error, match=needle.replace(".", r"\.").replace("'", ".")):
        preflight_hf_to_mcore(bad, tmp_path / "out", 1, 1, 128)
    assert not (tmp_path / "out").exists()


def test_untied_config_on_tied_weights_names_lm_head(tiny_models, tmp_path):
    bad = _edited_copy(tiny_models["qwen3_tied"], tmp_path / "bad", tie_word_embeddings=False)
    with pytest.raises(WeightMismatchError, match="'lm_head.weight' is missing"):
        preflight_hf_to_mcore(bad, tmp_path / "out", 1, 1, 128)


def test_missing_tensor_is_named(tiny_qwen3, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = _edited_copy(tiny_qwen3, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(WeightMismatchError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
        preflight_hf_to_mcore(bad, tmp_path / "out", 1, 1, 128)


def test_impossible_layout_and_existing_output(tiny_qwen3, tmp_path):
    with pytest.raises(LayoutError, match="parallel.tp=3 does not divide the 4 attention heads"):
        preflight_hf_to_mcore(tiny_qwen3, tmp_path / "out", 3, 1, 128)
    with pytest.raises(LayoutError, match="parallel.pp=4 does not divide the 2 layers"):
        preflight_hf_to_mcore(tiny_qwen3, tmp_path / "out", 1, 4, 128)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        preflight_hf_to_mcore(tiny_qwen3, tmp_path / "exists", 1, 1, 128)


def test_mcore_checkpoint_for_another_model_is_refused(converted, tmp_path):
    out, _ = converted
    meta = checkpoint.read_meta(out / "qwen3_untied_mc_11")
    other = ArchSpec.from_dict({**meta.arch.to_dict(), "num_layers": 4, "tied_embeddings": True})
    with pytest.raises(checkpoint.CheckpointError, match="num_layers: checkpoint 2 != model 4.*tied_embeddings"):
        checkpoint.check_compatible(meta, other, meta.padded_vocab_size, "ckpt")
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / checkpoint.META_FILE).write_text((out / "qwen3_untied_mc_11" / checkpoint.META_FILE).read_text())
    with pytest.raises(checkpoint.CheckpointError, match="no dist/"):
        preflight_mcore_to_hf(incomplete, tmp_path / "hf", 1, 1)


def test_killed_conversion_leaves_nothing_half_written(tiny_qwen3, tmp_path):
    """SIGKILL the converter while it writes: no output dir appears; a rerun clears the debris and succeeds."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "tools" / "convert_hf_to_mcore.py"), "--hf", str(tiny_qwen3), "--out",
           str(out), "--tp", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    partial = tmp_path / "out.partial"
    deadline = time.time() + 300
    while not partial.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    import os
    import signal

    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed conversion must not leave an output directory"
    subprocess.run(cmd, check=True, capture_output=True)
    assert checkpoint.read_meta(out).arch == ArchSpec.from_hf_dir(tiny_qwen3)
    assert not partial.exists()
