"""`harmony-mcore demo`: Self-Harmony visibly working on a CPU in minutes, and doing what it exists for.

1. A procedural task (harmony_mcore.data.synthetic): arithmetic word problems in two families. *Ordinary*
   questions, and *trapped* ones that carry a distractor ("Ann has 4 apples too.") which the warm-start
   corpus teaches the solver view to take for the start (80% of its worked solutions do) while a reframing
   that restates the problem (Focus on Constraints) drops it (50% right, 10% spurious, 40% scattered slips).
   On those shares the spurious answer wins the solver view's majority (TTRL's label) and the pooled vote of
   both views, and the right answer has the higher harmonic mean (Self-Harmony's label): a controlled test of
   the mechanism, not evidence about real models. A warm-start set with worked solutions of both views, and a
   disjoint unlabeled test-time set holding both families (ground truth kept for metrics only).
2. A 3.2M-parameter Qwen3-architecture policy with a tokenizer trained on the task, warm-started by supervised
   training with the project's own Megatron trainer (harmony_mcore.sft) until it solves most of the task and can
   write a reframing. Seeded; shipped in harmony_mcore/assets/demo_warm_start (13 MB, stamped with the digest of
   its WarmStartSettings) and copied to <out>/model; built here instead with --rebuild-model, or when the
   settings no longer match the shipped digest (--short uses smaller settings, so CI exercises the build).
3. Test-time RL on the unlabeled set through the real stack (configs/demo.yaml: Megatron policy at DP=2, vLLM-CPU
   dual-view rollouts, weight sync, distributed labels), once per selector and seed: the harmonic mean
   (Self-Harmony), majority voting over the solver view (TTRL), and majority voting over both views pooled (the
   arithmetic mean, lambda = 0). Same warm start, same seeds.
4. Every figure broken out by family (`family_summary`): avg@k and maj@k before and after (the evaluator's
   per-source metrics: the family is the question's source), label accuracy per step and, on trapped
   questions, the share whose label is the spurious answer. The per-family labels are recomputed from each
   run's rollout dump (logging.dump_rollouts) with the labeller itself (`label_batch`, one process) and checked
   against the trainer's own per-step label accuracy. summary.md, summary.json and comparison.png report them,
   with the Self-Harmony minus TTRL contrast on trapped questions over seeds (`contrast`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from harmony_mcore.config import Config, load_config
from harmony_mcore.data.synthetic import FAMILIES, TRAP_SOURCE, Difficulty, TrapMix, make_task, write_task
from harmony_mcore.fsutil import atomic_dir
from harmony_mcore.labels.config import LabelConfig
from harmony_mcore.metrics import read_metrics
from harmony_mcore.records import REFRAME, SOLVER, Question

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
SHIPPED_MODEL = Path(__file__).resolve().parent / "assets" / "demo_warm_start"
# labels.strategy -> name in the reports. "arithmetic" with equal view weights and equal samples per view is
# majority voting over both views pooled (the generalised mean with lambda = 0).
METHODS = {"harmonic": "Self-Harmony (harmonic)", "majority": "TTRL (majority, solver view)",
           "arithmetic": "majority, both views pooled"}
TRAPPED = FAMILIES[TRAP_SOURCE]
PLOT_WINDOW = 4


@dataclass(frozen=True)
class WarmStartSettings:
    """Everything the cached warm-start model depends on (its hash names the cache)."""

    task_seed: int = 0
    n_warm: int = 1600
    n_test: int = 64
    n_trap_warm: int = 400
    n_trap_test: int = 32
    trap_solver_spurious: float = 0.8
    trap_reframe_right: float = 0.5
    trap_reframe_spurious: float = 0.1
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

    def trap_mix(self) -> TrapMix:
        return TrapMix(self.trap_solver_spurious, self.trap_reframe_right, self.trap_reframe_spurious)


def build_task(out: Path, s: WarmStartSettings):
    task = make_task(s.task_seed, s.n_warm, s.n_test, difficulty=s.difficulty(), n_trap_warm=s.n_trap_warm,
                     n_trap_test=s.n_trap_test, trap_mix=s.trap_mix())
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
                                    f"logging.run_dir={run_dir}", "logging.dump_rollouts=true", *overrides])
    code = train(cfg)
    if code != 0:
        raise RuntimeError(f"{method} run (seed {seed}) exited with {code}")
    return run_dir


# ----------------------------------------------------------------------------- per-family figures


def family_label_figures(labels, family: Mapping[str, str], spurious: Mapping[str, str]
                         ) -> dict[str, dict[str, float]]:
    """Per family, over the questions of one step's labels (a `BatchLabels`) that have a ground truth:
        accuracy        share whose label is the ground truth's class (labels/accuracy, restricted);
        spurious_share  share whose label is the question's spurious answer (only where `spurious` has one);
        empty_share     share with an empty label;  questions  their number;
        <view>_right, <view>_spurious   share of the view's samples (the training rollouts) in the ground
                        truth's class / the spurious answer's class: sum_q c_view(a_q) / sum_q n_view.
    family: qid -> family name; spurious: qid -> spurious answer (compared after the labeller's
    normalisation).
    A family without questions this step is absent.
    """
    from harmony_mcore.labels.answers import normalize_answer

    groups: dict[str, list] = defaultdict(list)
    for qid, question in labels.questions.items():
        if question.ground_truth is not None:
            groups[family[qid]].append(question)
    out = {}
    for name, questions in sorted(groups.items()):
        truth = [q.ground_truth_class >= 0 and q.targets[0] == q.ground_truth_class for q in questions]
        row = {"accuracy": float(np.mean(truth)),
               "empty_share": float(np.mean([q.targets[0] < 0 for q in questions])),
               "questions": float(len(questions))}
        trapped = [q for q in questions if q.qid in spurious]
        spurious_class = {q.qid: q.classes.index(a) if (a := normalize_answer(spurious[q.qid], q.answer_type))
                          in q.classes else -1 for q in trapped}
        if trapped:
            row["spurious_share"] = float(np.mean([q.targets[0] >= 0 and q.targets[0] == spurious_class[q.qid]
                                                   for q in trapped]))
        for k, view in enumerate(labels.views):
            truth_class = {q.qid: q.ground_truth_class for q in questions}
            row[f"{view}_right"] = _class_share(questions, k, truth_class)
            if trapped:
                row[f"{view}_spurious"] = _class_share(trapped, k, spurious_class)
        out[name] = row
    return out


def _class_share(questions: Sequence, view: int, cls: Mapping[str, int]) -> float:
    """sum_q c_view(cls[q]) / sum_q n_view over `questions` (class -1: counts 0)."""
    hits = sum(q.counts[cls[q.qid]][view] for q in questions if cls[q.qid] >= 0)
    return float(hits / max(sum(q.totals[view] for q in questions), 1))


def step_samples(run_dir: Path) -> tuple[LabelConfig, list[list]]:
    """The run's label config and its rollout dump cut into steps (lists of `AnswerSample`). The dump appends
    each step's rollouts, the same number every step; a mismatch with the logged step count is an error."""
    from harmony_mcore.labels.io import read_samples

    cfg = load_config(run_dir / "config.yaml")
    samples = read_samples(run_dir / "rollouts.jsonl", cfg.labels.views)
    steps = sum("labels/accuracy" in r for r in read_metrics(run_dir / "metrics.jsonl"))
    per_step, rest = divmod(len(samples), max(steps, 1))
    if rest or not steps:
        raise RuntimeError(f"{run_dir}: {len(samples)} dumped rollouts do not split into {steps} steps")
    return cfg.labels, [samples[i * per_step:(i + 1) * per_step] for i in range(steps)]


def step_labels(run_dir: Path, strategy: str | None = None) -> list:
    """The labels of every step of a run (`BatchLabels`), recomputed from its rollout dump by the labeller on
    one process with the run's own label config, or with `strategy` instead of its selector (same samples).
    With the run's own selector, a step whose overall label accuracy differs from the one the trainer logged
    is an error."""
    from harmony_mcore.labels import label_batch

    label_cfg, chunks = step_samples(run_dir)
    if strategy is not None:
        label_cfg = replace(label_cfg, strategy=strategy, warmup_strategy=None)
    steps = [label_batch(chunk, label_cfg, step=i) for i, chunk in enumerate(chunks)]
    if strategy is None:
        logged = [r["labels/accuracy"] for r in read_metrics(run_dir / "metrics.jsonl") if "labels/accuracy" in r]
        for i, (labels, accuracy) in enumerate(zip(steps, logged, strict=True)):
            relabelled = labels.diagnostics["labels/accuracy"]
            if abs(relabelled - accuracy) > 1e-9:
                raise RuntimeError(f"{run_dir}: step {i} relabelled with accuracy {relabelled} but the trainer "
                                   f"logged {accuracy}")
    return steps


def selector_agreement(by_selector: Mapping[str, Sequence], family: Mapping[str, str]) -> dict[str, float]:
    """Per family: the share of (step, question) pairs on which every selector picks the same label, given the
    same samples. by_selector: selector -> one `BatchLabels` per step, all labelling the same rollouts."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for per_step in zip(*by_selector.values(), strict=True):
        for qid in per_step[0].questions:
            hits[family[qid]].append(len({labels.questions[qid].label for labels in per_step}) == 1)
    return {name: float(np.mean(values)) for name, values in sorted(hits.items())}


def family_summary(rows: Sequence[Mapping], step_figures: Sequence[Mapping[str, Mapping[str, float]]],
                   sources: Mapping[str, str]) -> dict[str, dict]:
    """Per family: avg@k / maj@k before (first eval) and after (last eval) from the evaluator's per-source
    metrics (eval/<source>/avg@k), and the per-step label figures (`family_label_figures`, one dict per step):
    label_acc (per step, nan where the step had none of the family), label_acc_mean (over the family's
    questions of all steps), first and second half of the steps; the same for spurious_label_share (trapped),
    empty_label_share and for the training rollouts' sample shares rollout_<view>_right / rollout_<view>_spurious (temperature
    of the rollouts, both views); questions_per_step. sources: source -> family name."""
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    out: dict[str, dict] = {}
    for source, name in sources.items():
        fam: dict = {}
        for metric in ("avg@k", "maj@k"):
            key = f"eval/{source}/{metric}"
            points = [r for r in evals if key in r]
            if points:
                fam[f"{metric}_before"], fam[f"{metric}_after"] = points[0][key], points[-1][key]
                fam[f"{metric}_steps"] = [r["step"] for r in points]
                fam[f"{metric}_curve"] = [r[key] for r in points]
        counts = [f.get(name, {}).get("questions", 0.0) for f in step_figures]
        fam["questions_per_step"] = counts
        sample_shares = [(f"{view}_{what}", f"rollout_{view}_{what}") for view in (SOLVER, REFRAME)
                         for what in ("right", "spurious")]
        label_shares = [("accuracy", "label_acc"), ("spurious_share", "spurious_label_share"),
                        ("empty_share", "empty_label_share")]
        for metric, out_key in (*label_shares, *sample_shares):
            values = [f.get(name, {}).get(metric, np.nan) for f in step_figures]
            if all(np.isnan(v) for v in values):
                continue
            fam[out_key] = values
            half = max(len(values) // 2, 1)
            halves = (("mean", slice(None)), ("first_half", slice(0, half)), ("second_half", slice(half, None)))
            for suffix, sl in halves:
                fam[f"{out_key}_{suffix}"] = _weighted_mean(values[sl], counts[sl])
        out[name] = fam
    return out


def _weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    """sum w v / sum w over the entries with w > 0 (per-question mean over steps); nan if none."""
    pairs = [(v, w) for v, w in zip(values, weights, strict=True) if w > 0]
    return float(sum(v * w for v, w in pairs) / sum(w for _, w in pairs)) if pairs else float("nan")


def moving_average(values: Sequence[float], weights: Sequence[float], window: int) -> list[float]:
    """Per step t: `_weighted_mean` over steps max(0, t - window + 1)..t (a few questions of a family per step
    make single steps too noisy to read)."""
    return [_weighted_mean(values[max(0, t - window + 1):t + 1], weights[max(0, t - window + 1):t + 1])
            for t in range(len(values))]


def run_summary(run_dir: Path, questions: Sequence[Question], spurious: Mapping[str, str]) -> dict:
    """Overall figures (as before: avg@k / maj@k before and after, label accuracy by halves) plus `families`
    (`family_summary`, and selector_agreement: `selector_agreement` of the compared selectors on this run's
    rollouts)."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in rows if "eval/avg@k" in r]
    steps = [r for r in rows if "labels/accuracy" in r]
    half = max(len(steps) // 2, 1)
    family = {q.qid: FAMILIES.get(q.source, q.source or "all") for q in questions}
    sources = {source: FAMILIES.get(source, source) for source in sorted({q.source for q in questions})}
    own = step_labels(run_dir)
    figures = [family_label_figures(labels, family, spurious) for labels in own]
    strategy = own[0].strategy if own else None
    agreement = selector_agreement(
        {m: own if m == strategy else step_labels(run_dir, m) for m in METHODS}, family)
    families = family_summary(rows, figures, sources)
    for name, share in agreement.items():
        families[name]["selector_agreement"] = share
    return {
        "avg@k_before": evals[0]["eval/avg@k"], "avg@k_after": evals[-1]["eval/avg@k"],
        "maj@k_before": evals[0]["eval/maj@k"], "maj@k_after": evals[-1]["eval/maj@k"],
        "label_acc_first_half": float(np.mean([r["labels/accuracy"] for r in steps[:half]])),
        "label_acc_second_half": float(np.mean([r["labels/accuracy"] for r in steps[half:]] or [np.nan])),
        "steps": len(steps),
        "families": families,
    }


# ----------------------------------------------------------------------------- reports


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def contrast(results: Mapping[str, Sequence[Mapping]], family: str, metric: str, a: str = "harmonic",
             b: str = "majority") -> dict[str, float | list[float]] | None:
    """Per-seed difference a - b of families[family][metric] (runs paired by seed order), its mean and sample
    standard deviation, and whether the mean exceeds twice that standard deviation (needs >= 2 seeds)."""
    if a not in results or b not in results:
        return None
    diffs = [ra["families"][family][metric] - rb["families"][family][metric]
             for ra, rb in zip(results[a], results[b], strict=True)
             if family in ra["families"] and metric in ra["families"][family]]
    if not diffs:
        return None
    mean, std = mean_std(diffs)
    return {"per_seed": diffs, "mean": mean, "std": std, "exceeds_2std": len(diffs) > 1 and mean > 2 * std}


def _cell(values: Sequence[float]) -> str:
    """mean, and ± the sample std when there are several values."""
    mean, std = mean_std(values)
    return f"{mean:.3f}" + (f" ± {std:.3f}" if len(values) > 1 else "")


def _column(runs: Sequence[Mapping], family: str, key: str) -> list[float]:
    return [r["families"][family][key] for r in runs]


def _halves(runs: Sequence[Mapping], family: str, key: str) -> str:
    first, second = (_cell(_column(runs, family, f"{key}_{half}")) for half in ("first_half", "second_half"))
    return f"{first} -> {second}"


ROLLOUT_SHARES = ("rollout_solver_right", "rollout_solver_spurious", "rollout_reframe_right",
                  "rollout_reframe_spurious")


def format_table(results: Mapping[str, Sequence[Mapping]]) -> str:
    """Markdown: per family, the accuracy and label table and the training rollouts' sample shares (mean ±
    sample std over seeds where there are several), then the Self-Harmony minus TTRL contrast on trapped
    questions."""
    families = list(dict.fromkeys(f for runs in results.values() for r in runs for f in r["families"]))
    all_runs = [r for runs in results.values() for r in runs]
    out = []
    for family in families:
        trapped = any("spurious_label_share" in r["families"][family] for r in all_runs)
        head = ("| method | avg@k before | avg@k after | gain | maj@k before | maj@k after "
                "| label acc (all steps; 1st half -> 2nd) | empty labels |"
                + (" spurious label share (1st half -> 2nd) |" if trapped else ""))
        out += [f"**{family} questions**", "", head, "|---" * (head.count("|") - 1) + "|"]
        for method, runs in results.items():
            before, after = _column(runs, family, "avg@k_before"), _column(runs, family, "avg@k_after")
            maj_before, maj_after = _column(runs, family, "maj@k_before"), _column(runs, family, "maj@k_after")
            line = (f"| {METHODS.get(method, method)} | {_cell(before)} | {_cell(after)}"
                    f" | {_cell([y - x for x, y in zip(before, after)])} | {_cell(maj_before)} | {_cell(maj_after)}"
                    f" | {_cell(_column(runs, family, 'label_acc_mean'))}; {_halves(runs, family, 'label_acc')}"
                    f" | {_cell(_column(runs, family, 'empty_label_share_mean'))} |")
            out.append(line + (f" {_halves(runs, family, 'spurious_label_share')} |" if trapped else ""))
        out.append("")
        agreement = [r["families"][family]["selector_agreement"] for r in all_runs
                     if "selector_agreement" in r["families"][family]]
        if agreement:
            out += [f"Same samples, different selectors: {', '.join(METHODS[m] for m in METHODS)} pick the same "
                    f"label for {_cell(agreement)} of the {family} questions of a step (over every step of every "
                    "run above).", ""]
        keys = [k for k in ROLLOUT_SHARES if all(f"{k}_first_half" in r["families"][family] for r in all_runs)]
        if keys:
            names = " | ".join(k.removeprefix("rollout_").replace("_", " ") for k in keys)
            out += [f"| training rollouts: share of samples (1st half -> 2nd) | {names} |",
                    "|---" * (len(keys) + 1) + "|"]
            for method, runs in results.items():
                shares = " | ".join(_halves(runs, family, k) for k in keys)
                out.append(f"| {METHODS.get(method, method)} | {shares} |")
            out.append("")
    if TRAPPED in families:
        for metric, name in (("avg@k_after", "final avg@k"), ("label_acc_mean", "label accuracy (all steps)")):
            c = contrast(results, TRAPPED, metric)
            if c is None:
                continue
            seeds = len(c["per_seed"])
            spread = f" ± {c['std']:.3f} over {seeds} seeds" if seeds > 1 else ""
            verdict = f"; {'exceeds' if c['exceeds_2std'] else 'does not exceed'} twice the seed-to-seed std"
            out.append(f"Trapped questions, Self-Harmony minus TTRL, {name}: {c['mean']:+.3f}{spread}"
                       + (verdict if seeds > 1 else "") + ".")
    return "\n".join(out).rstrip() + "\n"


def _json_ready(value):
    """nan (a family absent from a step) -> null, recursively: summary.json stays strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def comparison_plot(results: Mapping[str, Sequence[Mapping]], out: Path) -> None:
    """One row per family: avg@k at the evaluations, maj@k, label accuracy and (trapped) the share of spurious
    labels, both as a PLOT_WINDOW-step moving average over the family's questions (`moving_average`). A colour
    per method; thin lines per seed, thick the mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(f for runs in results.values() for r in runs for f in r["families"]))
    window = f"{PLOT_WINDOW}-step avg"
    panels = (("avg@k_curve", "test accuracy (avg@k)"), ("maj@k_curve", "maj@k"),
              ("label_acc", f"label accuracy ({window})"),
              ("spurious_label_share", f"spurious labels ({window})"))
    fig, axes = plt.subplots(len(families), len(panels), figsize=(18, 3.8 * len(families)), squeeze=False)
    colors = dict(zip(METHODS, ("tab:green", "tab:red", "tab:blue")))
    for row, family in zip(axes, families):
        for ax, (key, title) in zip(row, panels):
            for method, runs in results.items():
                fams = [r["families"][family] for r in runs if key in r["families"].get(family, {})]
                if not fams:
                    continue
                x_key = key.replace("_curve", "_steps") if key.endswith("_curve") else None
                curves = [f[key] if x_key else moving_average(f[key], f["questions_per_step"], PLOT_WINDOW)
                          for f in fams]
                xs = fams[0][x_key] if x_key else list(range(len(curves[0])))
                for curve in curves:
                    ax.plot(xs, curve, color=colors.get(method), alpha=0.3, lw=0.8)
                mean = np.nanmean(np.asarray(curves, dtype=float), axis=0)
                ax.plot(xs, mean, color=colors.get(method), lw=2, marker="o" if x_key else None,
                        label=f"{METHODS.get(method, method)} ({len(curves)} seeds)")
            if not ax.lines:
                ax.axis("off")
                continue
            ax.set_title(f"{family}: {title}")
            ax.set_xlabel("step")
            if not key.endswith("_curve"):  # label shares on a fixed scale; accuracies zoomed to their range
                ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
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
    settings = WarmStartSettings(n_warm=240, n_trap_warm=60, n_test=32, n_trap_test=16, epochs=1) if args.short \
        else WarmStartSettings()
    overrides = ["train.max_steps=2", "rollout.n_per_view=4", "eval.every=2", "eval.k=2",
                 "logging.progress=false"] if args.short else []
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
    results = {m: [run_summary(d, task.test, task.spurious) for d in dirs] for m, dirs in runs.items()}
    table = format_table(results)
    comparison_plot(results, out / "comparison.png")
    (out / "summary.md").write_text(table)
    contrasts = {metric: contrast(results, TRAPPED, metric) for metric in ("avg@k_after", "label_acc_mean")}
    (out / "summary.json").write_text(json.dumps(_json_ready(
        {"seeds": args.seeds, "methods": {m: METHODS[m] for m in args.methods}, "results": results,
         "contrast_trapped_harmonic_minus_majority": contrasts, "warm_start": asdict(settings),
         "seconds": time.perf_counter() - start}), indent=2))
    print(table)
    print(f"reports: {out}/comparison.png and {out}/<method>_seed<k>/report.png; total {time.perf_counter() - start:.0f}s")
    return 0
