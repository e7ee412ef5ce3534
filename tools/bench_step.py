"""Benchmark one training step of the tiny CPU configuration, phase by phase.

    python tools/bench_step.py [--steps 6] [--config configs/cpu_tiny.yaml] [key=value ...]

Runs the real trainer (`python -m harmony_mcore train --config configs/cpu_tiny.yaml ...`, eval, checkpoints
and the HF export off) on a tiny random Qwen3 and a synthetic task it creates, then reads metrics.jsonl. The
first step is a warm-up and is skipped; the others give per-phase means (perf/gen_s, perf/labels_s,
perf/logprob_s, perf/update_s, perf/sync_s out of perf/step_s) and shares of the step.
"other" = step - (generation + log-probs + update + sync): labels count as other (issue 5), and are reported
separately too. While the trainer runs, this script also notes when each metrics row appears, so the time
between steps that no perf/ timer covers (metrics logging, TensorBoard, the next step's setup) is shown as well.
The last line is one JSON object with "other_share" (a fraction of the mean step; the goal is < 0.10).
Extra key=value arguments are passed to the trainer as config overrides.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOAL = 0.10
PHASES = ("gen", "labels", "logprob", "update", "sync")  # perf/<phase>_s


def watch(cmd: list[str], metrics: Path, log: Path, timeout: float) -> tuple[int, list[float]]:
    """Run the trainer; returns its exit code and the wall time at which each metrics row appeared."""
    seen: list[float] = []
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    proc.kill()
                    raise TimeoutError(f"trainer still running after {timeout:.0f}s (log: {log})")
                if metrics.exists():
                    rows = sum(1 for line in metrics.read_text().splitlines() if line.strip())
                    seen.extend([time.monotonic()] * (rows - len(seen)))
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc.returncode, seen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="training steps (the first is skipped as warm-up)")
    p.add_argument("--config", default=str(REPO / "configs" / "cpu_tiny.yaml"))
    p.add_argument("--questions-per-step", type=int, default=4, help="must match the config's train value")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--keep", action="store_true", help="keep the temp directory (run dir, trainer log)")
    p.add_argument("--workdir", default=None, help="parent of the temp directory (default: the system temp)")
    args, overrides = p.parse_known_args(argv)
    if args.steps < 2:
        p.error("--steps must be >= 2 (the first step is a warm-up)")

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(1)
    from harmony_mcore.data.synthetic import make_task, write_task
    from harmony_mcore.tiny import make_tiny_hf_model

    root = Path(tempfile.mkdtemp(prefix="bench_step_", dir=args.workdir))
    try:
        hf = make_tiny_hf_model(root / "hf", "qwen3")
        _, test = write_task(make_task(0, 0, args.steps * args.questions_per_step), root / "task")
        run_dir = root / "run"
        cmd = [sys.executable, "-m", "harmony_mcore", "train", "--config", args.config, f"model.hf_path={hf}",
               f"train.data={test}", f"logging.run_dir={run_dir}", f"train.max_steps={args.steps}",
               f"train.questions_per_step={args.questions_per_step}", "eval.every=0", "checkpoint.every=0",
               "checkpoint.export_hf=false", *overrides]
        start = time.monotonic()
        rc, seen = watch(cmd, run_dir / "metrics.jsonl", root / "train.log", args.timeout)
        total = time.monotonic() - start
        if rc != 0:
            print((root / "train.log").read_text()[-4000:], file=sys.stderr)
            raise RuntimeError(f"trainer exited with {rc}")
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "perf/step_s" in r]
        if len(rows) < 2:
            raise RuntimeError(f"only {len(rows)} step rows in metrics.jsonl")
        timed = rows[1:]
        mean = lambda key: statistics.fmean(r[key] for r in timed)
        step = mean("perf/step_s")
        phase = {name: mean(f"perf/{name}_s") for name in PHASES}
        other = step - sum(phase[n] for n in ("gen", "logprob", "update", "sync"))
        # rows appear once per step; the gap between two appearances is the whole step period as the run sees it
        periods = [b - a for a, b in itertools.pairwise(seen[:len(rows)])]
        period = statistics.fmean(periods) if periods else float("nan")
        untimed = period - step

        print(f"{len(rows)} steps ({len(timed)} timed after a warm-up) of {Path(args.config).name}; trainer wall "
              f"{total:.1f}s including startup")
        print(f"{'phase':<28}{'mean s':>9}{'share':>9}")
        names = {"gen": "generation", "labels": "labels (counted in other)", "logprob": "log-probs",
                 "update": "update", "sync": "weight sync"}
        for name in PHASES:
            print(f"{names[name]:<28}{phase[name]:>9.3f}{phase[name] / step:>9.1%}")
        print(f"{'other (incl. labels)':<28}{other:>9.3f}{other / step:>9.1%}")
        print(f"{'other without labels':<28}{other - phase['labels']:>9.3f}{(other - phase['labels']) / step:>9.1%}")
        print(f"{'step':<28}{step:>9.3f}{1:>9.1%}")
        print(f"between steps, outside perf/step_s (logging etc.): {untimed:.3f} s per step "
              f"({untimed / period:.1%} of the {period:.3f} s step period)")
        verdict = "meets" if other / step < GOAL else "misses"
        print(f"other share {other / step:.1%}: {verdict} the < {GOAL:.0%} goal")
        report = {
            "other_share": round(other / step, 4), "goal": GOAL, "step_s": round(step, 4),
            "other_s": round(other, 4), "labels_share": round(phase["labels"] / step, 4),
            "other_without_labels_share": round((other - phase["labels"]) / step, 4),
            **{f"{name}_s": round(phase[name], 4) for name in PHASES},
            **{f"{name}_share": round(phase[name] / step, 4) for name in PHASES},
            "period_s": round(period, 4), "untimed_between_steps_s": round(untimed, 4),
            "untimed_share_of_period": round(untimed / period, 4), "timed_steps": len(timed),
            "steps_s": [round(r["perf/step_s"], 3) for r in timed],
        }
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
