"""One command for a lent GPU machine: does the GPU path of the policy work?

Runs the policy the way a GPU cluster runs it (Megatron-Core on CUDA over NCCL, the DistributedOptimizer with fp32
master weights, bf16 parameters, distributed checkpoints, HF export), through `harmony_mcore.mcore.policy.Policy`
at world size 1, on tiny random-weight models built here. No Ray, no vLLM (neither can be carried to the lent
machine, see docs/gpu.md). Each check runs in its own subprocess, so a crash or a hang in one does not
lose the others; each prints one line, and the last line of the output is one JSON object:
    {"device": ..., "ok": bool, "checks": {name: {"ok": bool, ...figures...}}, "wall_s": ...}

Checks (tolerances are for fp32 log-probs; bit-exact means torch.equal on every tensor):
  parity_fp32  Megatron's log-probs of the response tokens vs transformers' on the same device, max |d| <= 1e-4
  update_bf16  three bf16 GRPO updates move every response's mean log-prob with the sign of its advantage
  checkpoint   save -> update -> load restores parameters, fp32 master weights and Adam moments bit-exactly
  resume       update, save, update == update, save, fresh policy, load, update (parameters + optimizer state)
  export       export_hf reloads in transformers with the policy's log-probs, max |d| <= 1e-4
  throughput   a Qwen3-1.7B-shaped policy (random bf16 weights, local spec, SDPA attention, token-budget
               micro-batches) updated on 64 x 1,024 tokens of equal length, then on the same token count with
               skewed lengths (responses log-normal, 16 to 3,072 tokens): tokens/s of the reference forward and
               of the GRPO update, MFU (6N + causal attention FLOPs per token over 989 TFLOP/s, the H100/H200
               bf16 peak), peak allocated memory and `harmony-mcore plan`'s training-phase prediction for the
               same config. Goals (issue 14): MFU >= 0.35 on the equal-length batch, skewed tokens/s within
               1.25x, planner within 10%; reported in "goals", the check itself passes when it ran. On CPU a
               2-layer, hidden-256 model with a 4,096 vocabulary in fp32 on 8 short sequences (the code path only).

    python3 tools/gpu_check.py --out $OUT             # on the GPU machine (--device cuda is the default there)
    python tools/gpu_check.py --device cpu            # the same checks over gloo (CI runs this)

Exit status 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKS = ("parity_fp32", "update_bf16", "checkpoint", "resume", "export", "throughput")
PEAK_BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16 (datasheet)
# name: hidden, layers, heads, ffn, vocab (Qwen3: 8 KV heads of head_dim 128, tied embeddings)
QWEN3_SHAPES = {"qwen3-micro": (256, 2, 8, 512, 4096), "qwen3-1.7b": (2048, 28, 16, 6144, 151936)}
PARITY_TOL = 1e-4
BASE = ["parallel.micro_batch_size=2", "optim.lr=1e-3", "optim.warmup_ratio=0", "optim.grad_clip=0",
        "grpo.kl_coef=0.1", "train.questions_per_step=2"]
ADVANTAGES = (1.0, -1.0, 1.0, -1.0)


# ------------------------------------------------------------------------------------------ in the subprocess


def _setup(device: str) -> None:
    """The process group the policy joins: NCCL on CUDA, gloo on CPU (the policy's runtime says which)."""
    import torch
    import torch.distributed as dist

    from harmony_mcore.dist import free_port

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()), CUBLAS_WORKSPACE_CONFIG=":4096:8", GPU_CHECK_DEVICE=device)
    if device == "cuda":
        torch.cuda.set_device(0)
        torch.use_deterministic_algorithms(True, warn_only=True)  # the resume check compares bit for bit
    dist.init_process_group("nccl" if device == "cuda" else "gloo")


def _model(work: str, tied: bool, seed: int) -> str:
    from harmony_mcore.tiny import make_tiny_hf_model

    return str(make_tiny_hf_model(Path(work) / f"qwen3_{'tied' if tied else 'untied'}_{seed}", "qwen3",
                                  tied=tied, seed=seed))


def _policy(hf: str, overrides: list[str]):
    from harmony_mcore.config import load_config
    from harmony_mcore.mcore.policy import Policy
    from harmony_mcore.runtime import Runtime
    from harmony_mcore.weights.arch import ArchSpec

    cfg = load_config(None, [f"model.hf_path={hf}", *BASE, *overrides])
    return Policy(cfg, ArchSpec.from_hf_dir(hf), 10, rank=0, world=1, master_addr="127.0.0.1",
                  master_port=int(os.environ["MASTER_PORT"]), runtime=Runtime(device=os.environ["GPU_CHECK_DEVICE"]))


def _batch(vocab: int = 1000, seed: int = 0):
    import torch

    from harmony_mcore.mcore.policy import TrainSequence

    g = torch.Generator().manual_seed(seed)
    return [TrainSequence(tuple(torch.randint(0, vocab, (8 + 24 + 4 * i,), generator=g).tolist()), 8, a)
            for i, a in enumerate(ADVANTAGES)]


def _hf_logprobs(hf: str, seqs, device: str) -> list[list[float]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).to(device).eval()
    out = []
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s.tokens], device=device)
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)[:-1]  # position t predicts token t+1
            out.append(logp.gather(-1, ids[0, 1:, None])[s.prompt_len - 1:, 0].tolist())
    return out


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v))


def _state(policy) -> list:
    """Parameters, then every fp32 master weight and Adam moment, on the CPU."""
    out = [p.detach().cpu().clone() for p in policy.gpt.parameters()]
    for opt in getattr(policy.optimizer, "chained_optimizers", [policy.optimizer]):
        for group in opt.optimizer.param_groups:
            for main in group["params"]:
                state = opt.optimizer.state[main]
                out += [main.detach().cpu().clone()] + [state[k].detach().cpu().clone() for k in sorted(state)]
    return out


def _differences(a: list, b: list) -> int:
    import torch

    if len(a) != len(b):
        return max(len(a), len(b))
    return sum(not (x.dtype == y.dtype and torch.equal(x, y)) for x, y in zip(a, b))


def _update(policy, seqs) -> dict:
    policy.batch = seqs
    policy.compute_logprobs()
    return policy.train_step()


def check_parity_fp32(work: str, device: str) -> dict:
    hf, seqs = _model(work, tied=False, seed=0), _batch()
    policy = _policy(hf, ["model.dtype=float32"])
    diff = _max_diff(policy.response_logprobs(seqs), _hf_logprobs(hf, seqs, device))
    return {"ok": diff <= PARITY_TOL, "max_abs_logprob_diff": diff,
            "param_device": str(next(policy.gpt.parameters()).device),
            "optimizer": type(getattr(policy.optimizer, "chained_optimizers", [policy.optimizer])[0]).__name__}


def check_update_bf16(work: str, device: str) -> dict:
    hf, seqs = _model(work, tied=True, seed=1), _batch(seed=1)
    policy = _policy(hf, ["model.dtype=bfloat16"])
    before = policy.response_logprobs(seqs)
    grad_norms = [_update(policy, seqs)["grad_norm"] for _ in range(3)]
    after = policy.response_logprobs(seqs)
    moves = [(sum(a) / len(a) - sum(b) / len(b)) for a, b in zip(after, before)]
    return {"ok": all(m * s.advantage > 0 for m, s in zip(moves, seqs)), "mean_logprob_moves": moves,
            "grad_norms": grad_norms, "param_dtype": str(next(policy.gpt.parameters()).dtype)}


def check_checkpoint(work: str, device: str) -> dict:
    hf, seqs = _model(work, tied=True, seed=1), _batch(seed=1)
    policy = _policy(hf, ["model.dtype=bfloat16"])
    _update(policy, seqs)
    saved = _state(policy)
    t0 = time.perf_counter()
    policy.save_checkpoint(f"{work}/ckpt", {"step": 1})
    save_s = time.perf_counter() - t0
    _update(policy, seqs)
    moved = _differences(saved, _state(policy))
    t0 = time.perf_counter()
    policy.load_checkpoint(f"{work}/ckpt")
    load_s = time.perf_counter() - t0
    wrong = _differences(saved, _state(policy))
    return {"ok": moved > 0 and wrong == 0, "tensors": len(saved), "changed_by_update": moved,
            "differing_after_load": wrong, "save_s": round(save_s, 2), "load_s": round(load_s, 2)}


def check_resume(work: str, device: str) -> dict:
    hf, seqs = _model(work, tied=False, seed=2), _batch(seed=2)
    policy = _policy(hf, ["model.dtype=bfloat16"])
    _update(policy, seqs)
    policy.save_checkpoint(f"{work}/resume", {"step": 1})
    _update(policy, seqs)
    uninterrupted = _state(policy)
    resumed = _policy(hf, ["model.dtype=bfloat16"])
    resumed.load_checkpoint(f"{work}/resume")
    _update(resumed, seqs)
    wrong = _differences(uninterrupted, _state(resumed))
    return {"ok": wrong == 0, "tensors": len(uninterrupted), "differing": wrong}


def check_export(work: str, device: str) -> dict:
    hf, seqs = _model(work, tied=True, seed=3), _batch(seed=3)
    policy = _policy(hf, ["model.dtype=float32"])
    _update(policy, seqs)
    policy.export_hf(f"{work}/export")
    diff = _max_diff(policy.response_logprobs(seqs), _hf_logprobs(f"{work}/export", seqs, device))
    return {"ok": diff <= PARITY_TOL, "max_abs_logprob_diff": diff}


def _random_qwen3(out: str, name: str, device: str) -> str:
    """An HF directory with the config of `name` and random bf16 weights (initialised on `device`)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from harmony_mcore.tiny import train_tokenizer

    hidden, layers, heads, ffn, vocab = QWEN3_SHAPES[name]
    Path(out).mkdir(parents=True, exist_ok=True)
    train_tokenizer(out, vocab_size=1000)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
                      rms_norm_eps=1e-6, tie_word_embeddings=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    return out


def _skewed_lengths(total: int, prompt: int, max_response: int, seed: int = 0) -> list[int]:
    """Sequence lengths (prompt + a log-normal response of 16..max_response tokens) adding up to `total`."""
    import numpy as np

    rng, out = np.random.default_rng(seed), []
    while sum(out) < total:
        out.append(prompt + int(np.clip(rng.lognormal(np.log(400), 1.0), 16, max_response)))
    out[-1] -= sum(out) - total
    if out[-1] <= prompt and len(out) > 1:  # no room for a response: its tokens go to the previous sequence
        extra = out.pop()
        out[-1] += extra
    return out


def _flops_per_token(n_params: int, layers: int, heads: int, lengths: list[int]) -> float:
    """6N + causal attention (12 * L * heads * head_dim * S / 2 per token of a length-S sequence), token-mean."""
    attention = sum(n * 12 * layers * heads * 128 * n / 2 for n in lengths) / sum(lengths)
    return 6 * n_params + attention


def check_throughput(work: str, device: str) -> dict:
    import torch

    from harmony_mcore.mcore.policy import TrainSequence, micro_batch_tokens

    cuda = device == "cuda"
    name = "qwen3-1.7b" if cuda else "qwen3-micro"
    sequences, prompt, response, budget = (64, 256, 768, 8192) if cuda else (8, 32, 96, 512)
    hf = _random_qwen3(f"{work}/{name}", name, device)
    overrides = [f"model.dtype={'bfloat16' if cuda else 'float32'}", "model.layer_spec=local", "model.attention=sdpa", "grpo.kl_coef=0.005",
                 "optim.lr=3e-6", "optim.grad_clip=1.0", "parallel.micro_batch_size=2",
                 f"parallel.max_tokens_per_micro_batch={budget}", f"rollout.max_prompt_tokens={prompt}",
                 f"rollout.max_response_tokens={3072 if cuda else 192}"]
    policy = _policy(hf, overrides)
    n_params = sum(p.numel() for p in policy.gpt.parameters())
    hidden, layers, heads, _, vocab = QWEN3_SHAPES[name]
    g = torch.Generator().manual_seed(0)
    equal = [prompt + response] * sequences
    skewed = _skewed_lengths(sum(equal), prompt, 3072 if cuda else 192)
    result = {"model": name, "params": n_params, "token_budget": micro_batch_tokens(policy.cfg),
              "tokens_per_batch": sum(equal)}
    for label, lengths in (("equal", equal), ("skewed", skewed)):
        seqs = [TrainSequence(tuple(torch.randint(0, vocab, (n,), generator=g).tolist()), prompt,
                              1.0 if i % 2 else -1.0) for i, n in enumerate(lengths)]
        policy.batch = seqs
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(3):  # the first is the warm-up
            t0 = time.perf_counter()
            policy.compute_logprobs()
            if cuda:
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            policy.train_step()
            if cuda:
                torch.cuda.synchronize()
            times.append((t1 - t0, time.perf_counter() - t1))
        ref_s = sum(t[0] for t in times[1:]) / 2
        update_s = sum(t[1] for t in times[1:]) / 2
        flops = _flops_per_token(n_params, layers, heads, lengths) * sum(lengths)
        result[label] = {"sequences": len(lengths), "update_s": round(update_s, 3),
                         "update_tokens_per_s": round(sum(lengths) / update_s),
                         "update_mfu": round(flops / update_s / 1e12 / PEAK_BF16_TFLOPS, 4),
                         "ref_forward_tokens_per_s": round(sum(lengths) / ref_s),
                         "micro_batches": len(policy._plan()[0])}
        if cuda:
            result[label]["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    result["plan_config"] = [f"model.hf_path={hf}", *BASE, *overrides]  # the driver asks the planner
    result["ok"] = True  # it ran; the goals are measurements (add_goals)
    return result


def add_goals(result: dict, device: str) -> None:
    """The planner's training-phase prediction for the throughput run's config, and the goals of issue 14. Runs in
    the driver: the planner simulates its own process group, which a process with one cannot."""
    from harmony_mcore.config import load_config
    from harmony_mcore.plan import Hardware, make_plan

    cfg = load_config(None, [*result.pop("plan_config"), "train.questions_per_step=32", "rollout.n_per_view=1"])
    memory = make_plan(cfg, Hardware(1, 1, 141.0)).ranks[0].memory
    predicted = (memory.peak - memory.overhead) / 2**30  # allocated bytes (the overhead: CUDA context, NCCL)
    result["planner_train_gib"] = round(predicted, 2)
    goals = {"mfu_equal": result["equal"]["update_mfu"],
             "skewed_vs_equal": round(result["equal"]["update_tokens_per_s"]
                                      / result["skewed"]["update_tokens_per_s"], 3)}
    if device == "cuda":
        measured = max(result["equal"]["peak_allocated_gib"], result["skewed"]["peak_allocated_gib"])
        goals["planner_error"] = round((predicted - measured) / measured, 3)
    result["goals"] = goals
    result["goals_met"] = (goals["mfu_equal"] >= 0.35 and goals["skewed_vs_equal"] <= 1.25
                           and abs(goals.get("planner_error", 0)) <= 0.10)


def run_one(name: str, work: str, device: str) -> dict:
    _setup(device)
    result = globals()[f"check_{name}"](work, device)
    if device == "cuda":
        import torch

        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return result


# ------------------------------------------------------------------------------------------------ the driver


def environment() -> dict:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpus": torch.cuda.device_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    for module in ("megatron.core", "transformers", "transformer_engine", "apex", "vllm"):
        try:
            mod = __import__(module, fromlist=["__version__"])
            info[module] = getattr(mod, "__version__", "present")
        except ImportError:
            info[module] = None
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    ap.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {', '.join(CHECKS)}")
    ap.add_argument("--out", default="", help="also write results.json there")
    ap.add_argument("--work", default="", help="scratch directory (default: a temporary one)")
    ap.add_argument("--timeout-s", type=float, default=180.0, help="per check")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one check in this process
    args = ap.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if args.one:
        try:
            print("RESULT " + json.dumps(run_one(args.one, args.work, device)), flush=True)
        except Exception:  # noqa: BLE001 - reported as the check's failure by the driver
            print("RESULT " + json.dumps({"ok": False, "error": traceback.format_exc()[-2000:]}), flush=True)
        return 0
    names = [c for c in args.checks.split(",") if c]
    unknown = [c for c in names if c not in CHECKS]
    if unknown:
        print(f"gpu_check: unknown check {unknown[0]!r} (choose from {', '.join(CHECKS)})", file=sys.stderr)
        return 2
    start = time.perf_counter()
    work = args.work or tempfile.mkdtemp(prefix="gpu_check_")
    report = {"device": device, "environment": environment(), "checks": {}}
    for name in names:
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "--one", name, "--device", device, "--work", f"{work}/{name}"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s, cwd=REPO,
                                  env=os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [
                                      str(REPO), os.environ.get("PYTHONPATH", "")]))})
            line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("RESULT ")), None)
            result = json.loads(line[7:]) if line else {"ok": False, "error": (proc.stdout + proc.stderr)[-2000:]}
        except subprocess.TimeoutExpired:
            result = {"ok": False, "error": f"timed out after {args.timeout_s:.0f} s"}
        if name == "throughput" and result["ok"]:
            add_goals(result, device)
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        report["checks"][name] = result
        figures = {k: v for k, v in result.items() if k not in ("ok", "error")}
        print(f"{name:12s} {'PASS' if result['ok'] else 'FAIL'} {json.dumps(figures)[:300]}", flush=True)
        if "error" in result:
            print(result["error"], file=sys.stderr, flush=True)
    report["ok"] = all(c["ok"] for c in report["checks"].values())
    report["wall_s"] = round(time.perf_counter() - start, 1)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
