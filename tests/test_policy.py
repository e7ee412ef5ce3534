"""The Megatron policy rank on gloo (no Ray, no vLLM): GRPO update, non-finite handling, and checkpoint resume
with Megatron's DistributedOptimizer (the optimizer path of every machine) at DP=2, TP=2 and PP=2 in bf16, across
a layout change, and into a model whose layers carry TransformerEngine-style `_extra_state`."""

from __future__ import annotations

import io
import math

import pytest
import torch

from harmony_mcore.dist import spawn_gloo

TINY_OVERRIDES = ["optim.lr=1e-3", "optim.warmup_ratio=0", "optim.grad_clip=0", "grpo.kl_coef=0.1",
                  "parallel.micro_batch_size=2", "train.questions_per_step=2"]


def _policy(hf: str, overrides: list[str], rank: int, world: int, **kwargs):
    from harmony_mcore.config import load_config
    from harmony_mcore.mcore.policy import Policy
    from harmony_mcore.weights.arch import ArchSpec

    cfg = load_config(None, [f"model.hf_path={hf}", *TINY_OVERRIDES, *overrides])
    return Policy(cfg, ArchSpec.from_hf_dir(hf), 10, rank=rank, world=world, master_addr="127.0.0.1",
                  master_port=0, **kwargs)


def _batch(advantages: list[float], seed: int = 0):
    from harmony_mcore.mcore.policy import TrainSequence

    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i, a in enumerate(advantages):
        tokens = torch.randint(0, 1000, (12 + 3 * i,), generator=g).tolist()
        seqs.append(TrainSequence(tuple(tokens), 5, a))
    return seqs


def _response_logp(policy, seqs) -> list[float] | None:
    """Mean log-prob of each sequence's response tokens (last stage only)."""
    rows = policy.response_logprobs(seqs)
    return [sum(r) / len(r) for r in rows] if rows else None


SHIFT = 0.25  # the engine's log-probs, made lower than the trainer's by this much


def _update_case(rank: int, world: int, hf: str, tp: int, pp: int):
    from dataclasses import replace

    policy = _policy(hf, [f"parallel.tp={tp}", f"parallel.pp={pp}"], rank, world)
    seqs = _batch([1.0, -1.0, 1.0, -1.0])
    before = _response_logp(policy, seqs)
    # Rollout log-probs as an engine would report them: every response token's, here all 0.25 below the truth.
    # Only the last stage computes log-probs, so every rank takes its copy from there.
    exact = [policy.response_logprobs(seqs)]
    torch.distributed.broadcast_object_list(exact, src=torch.distributed.get_world_size() - 1)
    policy.batch = [replace(s, rollout_logprobs=tuple(x - SHIFT for x in lp)) for s, lp in zip(seqs, exact[0])]
    policy.compute_logprobs()
    first = policy.train_step()
    after = _response_logp(policy, policy.batch)
    return first, before, after


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_first_update_has_zero_kl_and_follows_the_advantages(tiny_qwen3, tp, pp):
    results = spawn_gloo(2, _update_case, str(tiny_qwen3), tp, pp)
    first, before, after = next(r for r in results if r[1] is not None)  # a last-stage rank
    assert first["loss/kl"] == 0.0, "policy == reference before the first update"
    assert first["tokens"] > 0 and first["grad_norm"] > 0
    # the train/rollout mismatch is measured on exactly the sampled tokens (positions aligned)
    assert first["mismatch/abs_mean"] == pytest.approx(SHIFT, abs=1e-5)
    assert first["mismatch/abs_max"] == pytest.approx(SHIFT, abs=1e-5)
    assert first["mismatch/ratio_mean"] == pytest.approx(math.exp(SHIFT), abs=1e-5)
    for adv, b, a in zip([1.0, -1.0, 1.0, -1.0], before, after):
        assert (a - b) * adv > 0, "log-probs of positive-advantage responses rise, negative ones fall"


def _nonfinite_case(rank: int, world: int, hf: str):
    from harmony_mcore.mcore.policy import NonFiniteError

    policy = _policy(hf, ["train.max_nonfinite_steps=2"], rank, world)
    policy.batch = _batch([float("nan"), 1.0])
    policy.compute_logprobs()
    params = [p.detach().clone() for p in policy.gpt.parameters()]
    skipped = policy.train_step()
    unchanged = all(torch.equal(a, b) for a, b in zip(params, policy.gpt.parameters()))
    try:
        policy.train_step()
    except NonFiniteError as e:
        return skipped, unchanged, str(e)
    return skipped, unchanged, None


def test_nonfinite_updates_are_skipped_then_stop_the_run(tiny_qwen3):
    (skipped, unchanged, error), = spawn_gloo(1, _nonfinite_case, str(tiny_qwen3))
    assert skipped["skipped_updates"] == 1 and unchanged
    assert error is not None and "2 consecutive updates with non-finite" in error


def _optimizer_state(policy) -> list[torch.Tensor]:
    """Every fp32 master weight and Adam moment (and step) of this rank, in a fixed order."""
    out = []
    for opt in getattr(policy.optimizer, "chained_optimizers", [policy.optimizer]):
        for group in opt.optimizer.param_groups:
            for main in group["params"]:
                state = opt.optimizer.state[main]
                out += [main.detach().clone()] + [state[k].detach().clone() for k in sorted(state)]
    return out


def _snapshot(policy) -> bytes:
    """Parameters and optimizer state, serialised (tensors cannot outlive a spawned worker in its queue)."""
    buf = io.BytesIO()
    torch.save([p.detach().clone() for p in policy.gpt.parameters()] + _optimizer_state(policy), buf)
    return buf.getvalue()


def _same(a: bytes, b: bytes) -> bool:
    x, y = (torch.load(io.BytesIO(v)) for v in (a, b))
    return len(x) == len(y) and all(u.dtype == v.dtype and torch.equal(u, v) for u, v in zip(x, y))


BATCH = [1.0, -1.0, 0.5, -0.5]


def _resume_case(rank: int, world: int, hf: str, ckpt: str, overrides: list[str]):
    """Update, save, update (the uninterrupted run) vs load into a fresh policy, update (the resumed run)."""
    policy = _policy(hf, overrides, rank, world)
    policy.batch = _batch(BATCH)
    policy.compute_logprobs()
    policy.train_step()
    saved = _snapshot(policy)
    policy.save_checkpoint(ckpt, {"step": 1})
    policy.train_step()
    continued = _snapshot(policy)
    resumed = _policy(hf, overrides, rank, world)
    extra = resumed.load_checkpoint(ckpt)
    restored = _snapshot(resumed)
    resumed.batch = policy.batch
    resumed.compute_logprobs()
    resumed.train_step()
    return {"step": extra["step"], "restored": _same(saved, restored), "resumed": _same(continued, _snapshot(resumed)),
            "logp": _response_logp(resumed, resumed.batch), "saved": saved, "continued": continued}


RESUME_LAYOUTS = {"dp2": ["parallel.dp=2"], "tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"]}


@pytest.fixture(scope="module")
def resumed_runs(tiny_qwen3, tmp_path_factory) -> dict:
    """bf16 resume cases, one 2-rank group per layout (their checkpoints feed the layout-change test)."""
    root = tmp_path_factory.mktemp("resume")
    runs = {}
    for name, layout in RESUME_LAYOUTS.items():
        ckpt = str(root / name)
        runs[name] = (ckpt, spawn_gloo(2, _resume_case, str(tiny_qwen3), ckpt, ["model.dtype=bfloat16", *layout]))
    return runs


@pytest.mark.parametrize("layout", list(RESUME_LAYOUTS))
def test_resume_restores_optimizer_state_and_continues_bit_exactly(resumed_runs, layout):
    _, results = resumed_runs[layout]
    for rank, r in enumerate(results):
        assert r["step"] == 1
        assert r["restored"], f"rank {rank}: params + fp32 master weights + Adam moments restored exactly"
        assert r["resumed"], f"rank {rank}: the update after the resume equals the uninterrupted one, bit for bit"


def _reshard_case(rank: int, world: int, hf: str, src: str, dst: str | None, overrides: list[str]):
    """Load a checkpoint written at another layout; optionally save it again at this one; then update."""
    policy = _policy(hf, ["model.dtype=bfloat16", *overrides], rank, world)
    policy.load_checkpoint(src)
    restored = _snapshot(policy)
    if dst:
        policy.save_checkpoint(dst, {"step": 1})
    policy.batch = _batch(BATCH)
    policy.compute_logprobs()
    policy.train_step()
    return restored, _snapshot(policy), _response_logp(policy, policy.batch)


def test_layout_change_keeps_the_state_exactly(resumed_runs, tiny_qwen3, tmp_path):
    """TP=2 checkpoint -> PP=2 (continues within reduction-order tolerance; saved again) -> TP=2 again: the
    optimizer state came through the other layout bit-exactly, so the next TP=2 update is the uninterrupted one."""
    tp2_ckpt, tp2 = resumed_runs["tp2"]
    via_pp2 = str(tmp_path / "via_pp2")
    pp2 = spawn_gloo(2, _reshard_case, str(tiny_qwen3), tp2_ckpt, via_pp2, ["parallel.pp=2"])
    last_stage = next(r for r in pp2 if r[2] is not None)
    assert last_stage[2] == pytest.approx(tp2[0]["logp"], abs=2e-2), "bf16 update at PP=2 ~ the TP=2 one"
    back = spawn_gloo(2, _reshard_case, str(tiny_qwen3), via_pp2, None, ["parallel.tp=2"])
    for rank, (restored, after, _) in enumerate(back):
        assert _same(restored, tp2[rank]["saved"]), f"rank {rank}: state after TP2 -> PP2 -> TP2 is the saved one"
        assert _same(after, tp2[rank]["continued"]), f"rank {rank}: and the next update is the uninterrupted one"


def _te_extra_state_case(rank: int, world: int, hf: str, ckpt: str):
    """A local-spec model-only checkpoint (what tools/convert_hf_to_mcore.py writes) loaded into a model whose
    attention carries `_extra_state`, as TransformerEngine's TEDotProductAttention does: a ShardedObject per layer
    that the checkpoint lacks (Megatron's local linear layers store theirs, so they are not the issue)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from harmony_mcore.mcore import checkpoint
    from harmony_mcore.mcore.convert import hf_to_mcore_worker

    hf_to_mcore_worker(rank, world, hf, ckpt, 1, 1, None, 128)
    plain = _policy(hf, [], rank, world)
    applied = []
    DotProductAttention.get_extra_state = lambda self: torch.tensor([7.0])
    DotProductAttention.set_extra_state = lambda self, state: applied.append(state)
    te_like = _policy(hf, [f"model.mcore_path={ckpt}", "grpo.kl_coef=0"], rank, world)  # weights from mcore_path
    extra_keys = [k for k in te_like.gpt.state_dict() if k.endswith("core_attention._extra_state")]
    same = all(torch.equal(a, b) for a, b in zip(plain.gpt.parameters(), te_like.gpt.parameters()))
    try:
        te_like.load_checkpoint(ckpt)  # a model-only checkpoint is no training checkpoint
        refusal = None
    except checkpoint.CheckpointError as e:
        refusal = str(e)
    return len(extra_keys), len(applied), same, refusal


def test_local_spec_checkpoint_loads_into_te_style_layers(tiny_qwen3, tmp_path):
    (n_extra, n_applied, same, refusal), = spawn_gloo(1, _te_extra_state_case, str(tiny_qwen3), str(tmp_path / "mc"))
    assert n_extra > 0, "the layers really carry _extra_state"
    assert n_applied == 0, "absent TE metadata is left at its defaults, not invented"
    assert same, "every weight loaded"
    assert refusal is not None and "no distributed-optimizer state" in refusal


def _cuda_visible_case(rank: int, world: int, hf: str):
    """The CPU runtime on a machine that has CUDA (availability faked): Megatron stays on the CPU, over gloo."""
    torch.cuda.is_available = lambda: True
    policy = _policy(hf, ["parallel.tp=2"], rank, world)
    return policy.runtime.device, torch.cuda.is_available(), next(policy.gpt.parameters()).device.type


def test_cpu_runtime_keeps_megatron_on_cpu_where_cuda_exists(tiny_qwen3):
    for device, cuda_seen, param_device in spawn_gloo(2, _cuda_visible_case, str(tiny_qwen3)):
        assert (device, cuda_seen, param_device) == ("cpu", False, "cpu")


def _wrong_backend_case(rank: int, world: int, hf: str):
    from harmony_mcore.mcore.parallel import LayoutError
    from harmony_mcore.runtime import Runtime

    try:
        _policy(hf, [], rank, world, runtime=Runtime(device="cuda"))
    except LayoutError as e:
        return str(e)
    return None


def test_a_runtime_that_contradicts_the_process_group_is_refused(tiny_qwen3):
    (message,) = spawn_gloo(1, _wrong_backend_case, str(tiny_qwen3))
    assert message is not None and "needs a nccl process group" in message


def _layout_case(rank: int, world: int, hf: str, tp: int, pp: int):
    """The same skewed batch through fixed micro-batches of 2 sequences and through token-budget ones."""
    g = torch.Generator().manual_seed(3)
    from harmony_mcore.mcore.policy import TrainSequence

    seqs = [TrainSequence(tuple(torch.randint(0, 1000, (n,), generator=g).tolist()), 5, a)
            for n, a in zip([60, 9, 33, 12, 80, 7], [1.0, -1.0, 0.5, -0.5, 1.0, -1.0])]
    out = {}
    for layout in ("fixed", "tokens"):
        policy = _policy(hf, [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.micro_batching={layout}",
                              "parallel.max_tokens_per_micro_batch=160"], rank, world)
        policy.batch = seqs
        policy.compute_logprobs()
        metrics = policy.train_step()
        grads = torch.cat([b.grad_data.float() for b in policy.model.buffers]).numpy()  # numpy: pickled by value
        out[layout] = ({k: v for k, v in metrics.items() if k.startswith(("loss/", "grad_norm", "tokens"))}, grads,
                       [mb.index for mb in policy._plan()[0]])
    return out


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_token_budget_micro_batches_leave_loss_and_gradients_unchanged(tiny_qwen3, tp, pp):
    for out in spawn_gloo(2, _layout_case, str(tiny_qwen3), tp, pp):
        (fixed, g_fixed, n_fixed), (packed, g_packed, n_packed) = out["fixed"], out["tokens"]
        assert n_fixed == [(0, 1), (2, 3), (4, 5)] and n_packed != n_fixed, "the layouts differ"
        assert fixed.keys() == packed.keys()
        for key in fixed:
            assert packed[key] == pytest.approx(fixed[key], rel=1e-5, abs=1e-6), key
        g_packed, g_fixed = torch.from_numpy(g_packed), torch.from_numpy(g_fixed)
        assert torch.allclose(g_packed, g_fixed, rtol=1e-4, atol=1e-6), (g_packed - g_fixed).abs().max()
