"""The memory-lean log-prob/entropy path (harmony_mcore.mcore.logprobs) against plain autograd: same values and
gradients, with a padded vocabulary, in fp32 and bf16, on one rank and split over TP=2 (gloo)."""

from __future__ import annotations

import pytest
import torch

from harmony_mcore.dist import spawn_gloo
from harmony_mcore.mcore.logprobs import reference_token_logprobs, token_logprobs

VOCAB, PADDED = 1000, 1024  # real vocabulary, Megatron's padded one


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(3, 17, PADDED, generator=g) * 3).to(dtype)
    targets = torch.randint(0, VOCAB, (3, 17), generator=g)
    # |dL/dH| < 1, as in training (entropy_coef / tokens): the reference's masked logits (float min) times a
    # larger upstream gradient overflow to inf * 0 = NaN in its backward
    g_logp, g_ent = torch.randn(3, 17, generator=g), torch.rand(3, 17, generator=g) - 0.5
    return logits, targets, g_logp, g_ent


def _run(fn, logits, targets, g_logp, g_ent, **kw):
    x = logits.detach().clone().requires_grad_(True)
    logp, ent = fn(x, targets, with_entropy=True, **kw)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    return logp.detach(), ent.detach(), x.grad.float()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_same_values_and_gradients_as_plain_autograd(dtype, tol):
    logits, targets, g_logp, g_ent = _inputs(dtype)
    kw = dict(vocab_start=0, real_vocab=VOCAB)
    lean = _run(token_logprobs, logits, targets, g_logp, g_ent, chunk_bytes=4 * PADDED * 5, **kw)  # 5-row chunks
    ref = _run(reference_token_logprobs, logits, targets, g_logp, g_ent, **kw)
    for a, b in zip(lean, ref):
        assert torch.allclose(a, b, atol=tol, rtol=tol), (a - b).abs().max()
    assert lean[2][..., VOCAB:].abs().max() == 0, "no gradient into the padded vocabulary rows"
    exact = torch.log_softmax(logits.float()[..., :VOCAB], -1).gather(-1, targets[..., None])[..., 0]
    assert torch.allclose(lean[0], exact, atol=tol)


def test_no_entropy_and_no_grad():
    logits, targets, _, _ = _inputs(torch.float32)
    with torch.no_grad():
        logp, ent = token_logprobs(logits, targets, vocab_start=0, real_vocab=VOCAB)
    assert ent is None and logp.shape == targets.shape and not logp.requires_grad


def _tp_case(rank: int, world: int):
    import torch.distributed as dist

    logits, targets, g_logp, g_ent = _inputs(torch.float32, seed=1)
    shard = PADDED // world
    mine = logits[..., rank * shard:(rank + 1) * shard]
    group = dist.new_group(list(range(world)))
    lean = _run(token_logprobs, mine, targets, g_logp, g_ent, vocab_start=rank * shard, real_vocab=VOCAB,
                group=group)
    full = _run(reference_token_logprobs, logits, targets, g_logp, g_ent, vocab_start=0, real_vocab=VOCAB)
    return [float((lean[i] - full[i]).abs().max()) for i in range(2)] + [
        float((lean[2] - full[2][..., rank * shard:(rank + 1) * shard]).abs().max())]


def test_tensor_parallel_shards_match_the_full_vocabulary():
    for diffs in spawn_gloo(2, _tp_case):
        assert max(diffs) < 1e-5, diffs
