"""Benchmark the Megatron side of a GRPO step on a batch with realistic, skewed response lengths (CPU).

    python tools/bench_update.py [--sequences 64] [--max-response 768] [--mbs 4] [--repeats 2] [shape args]

One process, one Megatron rank over gloo (world 1), a random Qwen3 built here. The batch: prompts of --prompt
tokens, responses log-normal (median --median-response) clipped to [16/4, --max-response] tokens, i.e. the 16 to
3,072 tokens of real RL responses scaled down 4x for a CPU. The same batch, in the same process, through:

  fixed   the previous layout: micro-batches of --mbs sequences in arrival order, each padded to its longest
  tokens  token-budget micro-batches (harmony_mcore.batching.pack; the default budget, --mbs x the longest
          possible sequence, so memory never exceeds the fixed layout's worst case)

For each: the reference log-probs (the KL term's forward pass) and one GRPO update, timed over --repeats after a
warm-up; tokens/s counts real (unpadded) tokens. Padding share: padded slots that hold no token. The log-prob path:
peak bytes allocated (torch's profiler memory timeline, an allocation tracker) while computing log-probs and entropy
of one fixed-layout micro-batch's logits and back-propagating, by harmony_mcore.mcore.logprobs.token_logprobs vs
the plain-autograd reference it replaced.

Goals (issue 14): packed_speedup >= 1.5, packed_padding_share <= 0.10, logprob_peak_ratio <= 0.5. The last line is
one JSON object with those three and the raw figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harmony_mcore.tiny import add_shape_args, make_qwen3_from_args  # noqa: E402

GOALS = {"packed_speedup": 1.5, "packed_padding_share": 0.10, "logprob_peak_ratio": 0.5}


def response_lengths(n: int, median: int, max_len: int, seed: int = 0) -> list[int]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [int(x) for x in np.clip(rng.lognormal(np.log(median), 1.0, n), 4, max_len)]


def _policy(hf: str, args, layout: str):
    from harmony_mcore.config import load_config
    from harmony_mcore.mcore.policy import Policy
    from harmony_mcore.weights.arch import ArchSpec

    cfg = load_config(None, [f"model.hf_path={hf}", f"parallel.micro_batching={layout}",
                             f"parallel.micro_batch_size={args.mbs}", f"rollout.max_prompt_tokens={args.prompt}",
                             f"rollout.max_response_tokens={args.max_response}", "grpo.kl_coef=0.005",
                             "optim.lr=1e-6", "optim.warmup_ratio=0", f"parallel.threads_per_rank={args.threads}"])
    return Policy(cfg, ArchSpec.from_hf_dir(hf), 100, rank=0, world=1, master_addr="127.0.0.1", master_port=0)


def _batch(args, vocab: int):
    import torch

    from harmony_mcore.mcore.policy import TrainSequence

    g = torch.Generator().manual_seed(0)
    out = []
    for i, n in enumerate(response_lengths(args.sequences, args.median_response, args.max_response)):
        tokens = torch.randint(0, vocab, (args.prompt + n,), generator=g).tolist()
        out.append(TrainSequence(tuple(tokens), args.prompt, 1.0 if i % 2 == 0 else -1.0))
    return out


def _peak_bytes(fn, logits, targets, real_vocab: int) -> int:
    """Peak bytes alive during fn's forward + backward (torch profiler's memory timeline)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    x = logits.detach().clone().requires_grad_(True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        logp, entropy = fn(x, targets, vocab_start=0, real_vocab=real_vocab, with_entropy=True)
        (logp.sum() + entropy.sum()).backward()
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        live += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, live)
    return peak


def worker(rank: int, world: int, hf: str, args) -> dict:
    import torch

    from harmony_mcore import batching
    from harmony_mcore.mcore.logprobs import reference_token_logprobs, token_logprobs
    from harmony_mcore.mcore.policy import PAD_MULTIPLE

    result: dict = {}
    for layout in ("fixed", "tokens"):
        policy = _policy(hf, args, layout)
        policy.batch = _batch(args, policy.arch.vocab_size)
        lengths = [len(s.tokens) for s in policy.batch]
        plan = [list(mb.index) for mb in policy._plan()[0]]
        policy.compute_logprobs()
        policy.train_step()  # warm-up
        start = time.perf_counter()
        for _ in range(args.repeats):
            policy.compute_logprobs()
            policy.train_step()
        seconds = (time.perf_counter() - start) / args.repeats
        result[layout] = {"tokens_per_s": sum(lengths) / seconds, "seconds": seconds, "micro_batches": len(plan),
                          "padding_share": batching.padding_share(lengths, plan, PAD_MULTIPLE)}
        if layout == "fixed":
            longest = max(len(policy.batch[i].tokens) for i in plan[0])
            S = batching.padded_len(longest, PAD_MULTIPLE)
            logits = torch.randn(len(plan[0]), S, policy.padded_vocab)
            targets = torch.randint(0, policy.arch.vocab_size, (len(plan[0]), S))
            result["logprob_peak_bytes"] = {
                "reference": _peak_bytes(reference_token_logprobs, logits, targets, policy.arch.vocab_size),
                "lean": _peak_bytes(token_logprobs, logits, targets, policy.arch.vocab_size),
                "logits_bytes": logits.numel() * logits.element_size()}
    return result


def main(argv: list[str] | None = None) -> int:
    from harmony_mcore.dist import spawn_gloo

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sequences", type=int, default=64)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--median-response", type=int, default=128)
    p.add_argument("--max-response", type=int, default=768)
    p.add_argument("--mbs", type=int, default=4, help="sequences per micro-batch of the fixed layout")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    add_shape_args(p, layers=2, hidden=256, heads=4, kv_heads=2, head_dim=64, ffn=768, vocab=8192)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_update_") as tmp:
        hf = make_qwen3_from_args(Path(tmp) / "hf", args)
        (r,) = spawn_gloo(1, worker, str(hf), args, threads=args.threads, timeout=3600)
    fixed, tokens, peak = r["fixed"], r["tokens"], r["logprob_peak_bytes"]
    out = {"packed_speedup": tokens["tokens_per_s"] / fixed["tokens_per_s"],
           "packed_padding_share": tokens["padding_share"], "fixed_padding_share": fixed["padding_share"],
           "logprob_peak_ratio": peak["lean"] / peak["reference"],
           "fixed_tokens_per_s": fixed["tokens_per_s"], "packed_tokens_per_s": tokens["tokens_per_s"],
           "fixed_micro_batches": fixed["micro_batches"], "packed_micro_batches": tokens["micro_batches"],
           "logprob_peak_mib": {k: v / 2**20 for k, v in peak.items()}}
    out["goals_met"] = (out["packed_speedup"] >= GOALS["packed_speedup"]
                        and out["packed_padding_share"] <= GOALS["packed_padding_share"]
                        and out["logprob_peak_ratio"] <= GOALS["logprob_peak_ratio"])
    print(f"fixed  : {fixed['tokens_per_s']:8.0f} tokens/s, padding {fixed['padding_share']:.1%}, "
          f"{fixed['micro_batches']} micro-batches")
    print(f"tokens : {tokens['tokens_per_s']:8.0f} tokens/s, padding {tokens['padding_share']:.1%}, "
          f"{tokens['micro_batches']} micro-batches")
    print(f"speed-up {out['packed_speedup']:.2f}x (goal >= 1.5); log-prob path peak "
          f"{peak['lean'] / 2**20:.0f} vs {peak['reference'] / 2**20:.0f} MiB = {out['logprob_peak_ratio']:.2f}x "
          f"(goal <= 0.5; logits {peak['logits_bytes'] / 2**20:.0f} MiB)")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
