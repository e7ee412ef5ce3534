"""`harmony-mcore eval`: avg@k / maj@k / pass@k of a model on benchmark files, as the papers report them.

    harmony-mcore eval --model DIR --data FILE [FILE ...] [--k 16 --temperature 0.8 --top-p 0.95
                       --max-tokens 3072] [--out results.json]

--model is a Hugging Face directory (config.json) or a harmony_mcore / Megatron-Core checkpoint (harmony.json,
dist/, hf/), which is first exported to a temporary HF directory under $TMPDIR by the converter of
tools/convert_mcore_to_hf.py. Every question with a ground-truth answer gets k samples of the solver prompt
from one vLLM engine run in this process; correctness uses the labeller's answer extraction and equivalence
classes (harmony_mcore.evaluate). Questions without an answer are counted and not sampled. Metrics are
reported per benchmark, i.e. per question `source` (a question with an empty source takes its file's name),
and over all questions.
Request seeds are those of the trainer's periodic evaluation (run seed --seed, step -1).

Writes a table to stdout and a JSON file: --out, by default `<model dir>.eval.json` beside the model directory
(`./<model name>.eval.json` when that directory is not writable), holding
    settings    the options, the model kind and the question files
    metrics     the flat "eval/..." keys the trainer logs to metrics.jsonl
    benchmarks  {benchmark: {questions, avg@k, maj@k, pass@k}}, and "overall" over every question
    questions   [{id, source, answer, correct: [bool] * k, majority_correct, truncated (+ samples)}]
    counts      loaded, skipped rows, unlabelled, evaluated questions; samples; response tokens
    timing_s    load, tokenize, export, engine_start, generate, score
Exit status: 0 on success; 2 on bad input (a data error naming file, row and field; a question id in two
files; a prompt over --max-prompt-tokens; a model directory that is missing, of neither kind, or an incomplete,
damaged or unfinished (.partial) checkpoint; an option out of range; an --out that cannot be written).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

from rich.console import Console
from rich.table import Table

from harmony_mcore.data import DataError, LoadResult, read_questions
from harmony_mcore.data.cli import MAX_REPORTED_SKIPS
from harmony_mcore.evaluate import QuestionResult, score_questions, summarize
from harmony_mcore.labels.config import LabelConfig
from harmony_mcore.fsutil import PARTIAL_SUFFIX, atomic_file
from harmony_mcore.mcore.checkpoint import META_FILE, CheckpointError, read_meta
from harmony_mcore.mcore.parallel import LayoutError
from harmony_mcore.records import SOLVER, Question, Rollout
from harmony_mcore.runtime import Runtime, local_gpus, standalone
from harmony_mcore.rollout.engine import GenerationRequest

if TYPE_CHECKING:
    from harmony_mcore.rollout.engine import RolloutEngine

ModelKind = Literal["hf", "mcore"]
PREFIX = "eval"
ALL = "overall"  # the row of all questions together
EVAL_STEP = -1  # the step of the trainer's evaluation requests (harmony_mcore.train): same request seeds
CPU_MEMORY_SHARE = 0.1  # on CPU vLLM's "gpu_memory_utilization" is the share of RAM for the KV cache
GPU_MEMORY_SHARE = 0.9


class EvalInputError(ValueError):
    """Input the user can fix (exit status 2)."""


@dataclass(frozen=True)
class BenchmarkRow:
    """One line of the table: a benchmark (question source), or ALL."""

    name: str
    questions: int
    avg_at_k: float
    maj_at_k: float
    pass_at_k: float

    def metrics(self) -> dict[str, float | int]:
        return {"questions": self.questions, "avg@k": self.avg_at_k, "maj@k": self.maj_at_k,
                "pass@k": self.pass_at_k}


@dataclass(frozen=True)
class Benchmarks:
    """The questions of every file, and what loading them reported."""

    questions: tuple[Question, ...]
    loads: tuple[LoadResult, ...]

    @property
    def skipped(self) -> tuple[DataError, ...]:
        return tuple(e for load in self.loads for e in load.skipped)

    @property
    def labelled(self) -> tuple[Question, ...]:
        return tuple(q for q in self.questions if q.ground_truth)


# ------------------------------------------------------------------------------------------------ options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harmony-mcore eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="HF directory or mcore checkpoint directory")
    p.add_argument("--data", required=True, nargs="+", type=Path, help="question file(s), any loader format")
    p.add_argument("--k", type=int, default=16, help="samples per question (default 16)")
    p.add_argument("--temperature", type=float, default=0.8, help="default 0.8")
    p.add_argument("--top-p", type=float, default=0.95, help="default 0.95")
    p.add_argument("--max-tokens", type=int, default=3072, help="max response tokens (default 3072)")
    p.add_argument("--max-prompt-tokens", type=int, default=2048,
                   help="longest prompt allowed; a longer one is an error naming the question (default 2048)")
    p.add_argument("--prompt-style", choices=("base", "chat"), default="base",
                   help="base: plain prompt (base models); chat: the tokenizer's chat template (instruct)")
    p.add_argument("--seed", type=int, default=0, help="engine and per-request sampling seed (default 0)")
    p.add_argument("--out", type=Path, help="JSON results (default: <model dir>.eval.json, see above)")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip invalid rows and report them")
    p.add_argument("--save-samples", action="store_true", help="also store every sample's text in the JSON")
    p.add_argument("--gpu-memory-utilization", type=float,
                   help=f"vLLM memory share (default {GPU_MEMORY_SHARE} on GPU; on CPU the share of RAM "
                        f"for the KV cache, default {CPU_MEMORY_SHARE})")
    p.add_argument("--tp", type=int, default=1, help="vLLM tensor parallel size (GPUs)")
    p.add_argument("--dtype", default="auto", help="vLLM dtype: auto (vLLM's choice), float32, bfloat16, ...")
    return p


DTYPES = ("auto", "float32", "float", "bfloat16", "float16", "half")  # what vLLM's --dtype accepts


def check_options(args: argparse.Namespace) -> None:
    share = args.gpu_memory_utilization
    rules = [(args.k >= 1, "--k must be >= 1"),
             (math.isfinite(args.temperature) and args.temperature >= 0, "--temperature must be a number >= 0"),
             (0 < args.top_p <= 1, "--top-p must be in (0, 1]"),
             (args.max_tokens >= 1, "--max-tokens must be >= 1"),
             (args.max_prompt_tokens >= 1, "--max-prompt-tokens must be >= 1"),
             (args.tp >= 1, "--tp must be >= 1"),
             (share is None or 0 < share <= 1, "--gpu-memory-utilization must be in (0, 1]"),
             (args.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")]
    for ok, message in rules:
        if not ok:
            raise EvalInputError(message)


# ------------------------------------------------------------------------------------------------- inputs


def detect_model_kind(model: Path) -> ModelKind:
    """"mcore" for a checkpoint directory (harmony.json), "hf" for a Hugging Face one (config.json)."""
    if not model.exists():
        raise EvalInputError(f"--model {model}: does not exist")
    if model.name.endswith(PARTIAL_SUFFIX):
        raise EvalInputError(f"--model {model}: an unfinished write ({PARTIAL_SUFFIX}), not a complete model")
    if (model / META_FILE).is_file():
        return "mcore"
    if (model / "config.json").is_file():
        return "hf"
    raise EvalInputError(f"{model}: neither an HF model directory (config.json) nor an mcore checkpoint "
                         f"({META_FILE}); of a run directory, pass checkpoints/step_* or final_hf")


def check_model(model: Path, kind: ModelKind) -> None:
    """What can be checked before the long part: a readable config.json (HF), or a complete checkpoint with its
    hf/ config and tokenizer copy (mcore)."""
    if kind == "mcore":
        try:
            read_meta(model)
        except CheckpointError:
            raise
        except (ValueError, KeyError, TypeError) as err:  # fields of a damaged harmony.json
            raise EvalInputError(f"{model / META_FILE} is damaged ({type(err).__name__}: {err})") from None
        for part in ("dist", "hf"):
            if not (model / part).is_dir():
                raise CheckpointError(f"{model}: incomplete checkpoint (no {part}/ directory)")
    config = tokenizer_dir(model, kind) / "config.json"
    try:
        if not isinstance(json.loads(config.read_text(encoding="utf-8")), dict):
            raise EvalInputError(f"{config}: must hold a JSON object")
    except (OSError, ValueError) as err:
        if isinstance(err, EvalInputError):
            raise
        raise EvalInputError(f"{config}: cannot be read as JSON ({err})") from None


def tokenizer_dir(model: Path, kind: ModelKind) -> Path:
    """Where the tokenizer files are: the HF directory, or the checkpoint's hf/ copy of its source's."""
    return model / "hf" if kind == "mcore" else model


def _with_source(question: Question, default: str) -> Question:
    return question if question.source else dataclasses.replace(question, source=default)


def load_benchmarks(paths: Sequence[Path], skip_bad_rows: bool) -> Benchmarks:
    """Questions of every file (an empty source becomes the file's name); an id may occur once in all."""
    loads: list[LoadResult] = []
    questions: list[Question] = []
    file_of: dict[str, Path] = {}
    for path in paths:
        load = read_questions(path, skip_bad_rows=skip_bad_rows)
        loads.append(load)
        for q in load.questions:
            if q.qid in file_of:
                raise EvalInputError(f"question id {q.qid!r} is in both {file_of[q.qid]} and {path}")
            file_of[q.qid] = path
            questions.append(_with_source(q, Path(path).stem))
    return Benchmarks(tuple(questions), tuple(loads))


def make_requests(questions: Sequence[Question], tokenizer_path: Path, args: argparse.Namespace
                  ) -> list[GenerationRequest]:
    """k samples of the solver prompt per question, with the trainer's evaluation seeds."""
    from transformers import AutoTokenizer

    from harmony_mcore.rollout.dispatch import build_requests
    from harmony_mcore.rollout.prompts import PromptTemplates

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
    try:
        return build_requests(questions, PromptTemplates(style=args.prompt_style), tokenizer, [], n=args.k,
                              run_seed=args.seed, step=EVAL_STEP, max_prompt_tokens=args.max_prompt_tokens,
                              views=(SOLVER,))
    except ValueError as e:  # a prompt over --max-prompt-tokens, named by question
        raise EvalInputError(f"{e} (raise --max-prompt-tokens)") from e


# ------------------------------------------------------------------------------------------ model, engine


def export_mcore(mcore_dir: Path, out: Path) -> Path:
    """The checkpoint as an HF directory at `out` (tools/convert_mcore_to_hf.py at TP = PP = 1)."""
    from harmony_mcore.dist import spawn_gloo
    from harmony_mcore.mcore.convert import DEFAULT_SHARD_BYTES, mcore_to_hf_worker, preflight_mcore_to_hf

    preflight_mcore_to_hf(mcore_dir, out, 1, 1)
    spawn_gloo(1, mcore_to_hf_worker, str(mcore_dir), str(out), 1, 1, DEFAULT_SHARD_BYTES)
    return out


@contextlib.contextmanager
def engine_model_dir(model: Path, kind: ModelKind) -> Iterator[Path]:
    """An HF directory vLLM can load: the model itself, or a temporary export of the checkpoint."""
    if kind == "hf":
        yield model
        return
    with tempfile.TemporaryDirectory(prefix="harmony-eval-") as tmp:
        yield export_mcore(model, Path(tmp) / "hf")


def memory_share(requested: float | None, runtime: Runtime) -> float:
    if requested is not None:
        return requested
    return GPU_MEMORY_SHARE if runtime.on_gpu else CPU_MEMORY_SHARE


def start_engine(hf_dir: Path, max_model_len: int, args: argparse.Namespace, runtime: Runtime) -> RolloutEngine:
    """One in-process RolloutEngine (its EngineCore runs in a vLLM subprocess)."""
    from harmony_mcore.rollout.engine import EngineSettings, RolloutEngine

    return RolloutEngine(EngineSettings(
        hf_dir=str(hf_dir), dtype=args.dtype, max_model_len=max_model_len, tensor_parallel_size=args.tp,
        gpu_memory_utilization=memory_share(args.gpu_memory_utilization, runtime),
        enforce_eager=not runtime.on_gpu, seed=args.seed, runtime=runtime))


# ---------------------------------------------------------------------------------------------- scoring


def benchmark_rows(metrics: dict[str, float], prefix: str = PREFIX) -> list[BenchmarkRow]:
    """Table rows from `summarize`'s keys: benchmarks by name, then ALL (every question)."""
    rows = []
    for key in metrics:
        if key.endswith("/avg@k"):
            base = key[: -len("avg@k")]
            name = base[len(prefix) + 1: -1] or ALL
            rows.append(BenchmarkRow(name, int(metrics[base + "questions"]), metrics[base + "avg@k"],
                                     metrics[base + "maj@k"], metrics[base + "pass@k"]))
    return sorted(rows, key=lambda r: (r.name == ALL, r.name))


# ----------------------------------------------------------------------------------------------- output


def render_table(rows: Sequence[BenchmarkRow], k: int) -> Table:
    """benchmark, questions, avg@k, maj@k, pass@k (percent, one decimal)."""
    table = Table(title=f"avg@{k} / maj@{k} / pass@{k}")
    table.add_column("benchmark")
    for header in ("questions", f"avg@{k}", f"maj@{k}", f"pass@{k}"):
        table.add_column(header, justify="right")
    for r in rows:
        percents = (f"{100 * v:.1f}" for v in (r.avg_at_k, r.maj_at_k, r.pass_at_k))
        table.add_row(r.name, str(r.questions), *percents)
    return table


def print_table(rows: Sequence[BenchmarkRow], k: int, file: TextIO | None = None) -> None:
    Console(file=file or sys.stdout, width=100).print(render_table(rows, k))


def question_records(questions: Sequence[Question], results: Sequence[QuestionResult],
                     rollouts: Sequence[Rollout], save_samples: bool) -> list[dict[str, Any]]:
    """Per-question JSON entries (results in the order of `questions`)."""
    samples: dict[str, list[Rollout]] = defaultdict(list)
    for r in rollouts:
        samples[r.qid].append(r)
    records = []
    for q, res in zip(questions, results, strict=True):
        record: dict[str, Any] = {"id": q.qid, "source": q.source, "answer": q.ground_truth,
                                  "correct": list(res.correct), "majority_correct": res.majority_correct,
                                  "truncated": sum(r.truncated for r in samples[q.qid])}
        if save_samples:
            record["samples"] = [{"text": r.text, "finish_reason": r.finish_reason} for r in samples[q.qid]]
        records.append(record)
    return records


def settings_record(args: argparse.Namespace, kind: ModelKind, runtime: Runtime) -> dict[str, Any]:
    return {"model": str(args.model.resolve()), "model_kind": kind,
            "data": [str(p.resolve()) for p in args.data], "k": args.k, "temperature": args.temperature,
            "top_p": args.top_p, "max_tokens": args.max_tokens, "max_prompt_tokens": args.max_prompt_tokens,
            "prompt_style": args.prompt_style, "seed": args.seed, "dtype": args.dtype, "tp": args.tp,
            "gpu_memory_utilization": memory_share(args.gpu_memory_utilization, runtime), "eval_step": EVAL_STEP,
            "device": runtime.device}


def build_report(settings: dict[str, Any], metrics: dict[str, float], rows: Sequence[BenchmarkRow],
                 questions: list[dict[str, Any]], counts: dict[str, int], timing: dict[str, float]
                 ) -> dict[str, Any]:
    return {"settings": settings, "metrics": metrics, "benchmarks": {r.name: r.metrics() for r in rows},
            "questions": questions, "counts": counts, "timing_s": {k: round(v, 3) for k, v in timing.items()}}


def default_out(model: Path) -> Path:
    """`<model dir>.eval.json` beside the model directory, or in the working directory if that one is
    read-only."""
    model = model.resolve()
    name = f"{model.name}.eval.json"
    return model.parent / name if os.access(model.parent, os.W_OK) else Path.cwd() / name


def check_writable(path: Path) -> Path:
    """Fail before the long part when the results could not be written."""
    parent = path.parent.resolve()
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not (existing.is_dir() and os.access(existing, os.W_OK)) or path.is_dir():
        raise EvalInputError(f"--out {path}: cannot write there")
    return path


def write_json(report: dict[str, Any], path: Path) -> Path:
    """Write atomically (a reader never sees half a file)."""
    with atomic_file(path) as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
        f.write("\n")
    return path


def report_loads(bench: Benchmarks) -> None:
    for load in bench.loads:
        print(load.summary(), file=sys.stderr)
    skipped = bench.skipped
    if skipped:
        print(f"skipped {len(skipped)} bad rows:", file=sys.stderr)
        for error in skipped[:MAX_REPORTED_SKIPS]:
            print(f"  {error}", file=sys.stderr)
        if len(skipped) > MAX_REPORTED_SKIPS:
            print(f"  ... and {len(skipped) - MAX_REPORTED_SKIPS} more", file=sys.stderr)
    unlabelled = len(bench.questions) - len(bench.labelled)
    if unlabelled:
        print(f"{unlabelled} questions have no answer: not evaluated", file=sys.stderr)


# -------------------------------------------------------------------------------------------------- main


def _elapsed(timing: dict[str, float], key: str, start: float) -> float:
    now = time.perf_counter()
    timing[key] = now - start
    return now


def sample(questions: Sequence[Question], args: argparse.Namespace, kind: ModelKind, runtime: Runtime,
           timing: dict[str, float]) -> list[Rollout]:
    """k solver samples per question from the model (exported first if a checkpoint); times each phase."""
    from harmony_mcore.rollout.engine import SamplingSettings

    t = time.perf_counter()
    requests = make_requests(questions, tokenizer_dir(args.model, kind), args)
    max_model_len = max(len(r.prompt_ids) for r in requests) + args.max_tokens
    t = _elapsed(timing, "tokenize", t)
    with engine_model_dir(args.model, kind) as hf_dir:
        t = _elapsed(timing, "export", t)
        engine = start_engine(hf_dir, max_model_len, args, runtime)
        t = _elapsed(timing, "engine_start", t)
        sampling = SamplingSettings(args.temperature, args.top_p, args.max_tokens)
        try:
            rollouts = engine.generate(requests, sampling)
            _elapsed(timing, "generate", t)
        finally:
            engine.shutdown()
    return rollouts


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Load, sample, score, write `out`; returns the report. Bad input raises EvalInputError, DataError,
    CheckpointError or LayoutError."""
    timing: dict[str, float] = {}
    t = time.perf_counter()
    check_options(args)
    kind = detect_model_kind(args.model)
    check_model(args.model, kind)
    check_writable(out)
    bench = load_benchmarks(args.data, args.skip_bad_rows)
    report_loads(bench)
    questions = bench.labelled
    if not questions:
        raise EvalInputError("no question with a ground-truth answer: nothing to evaluate")
    _elapsed(timing, "load", t)
    runtime = standalone(local_gpus())  # one engine, weights from disk
    rollouts = sample(questions, args, kind, runtime, timing)
    t = time.perf_counter()
    results = score_questions(questions, rollouts, LabelConfig())
    metrics = summarize(results, PREFIX)
    _elapsed(timing, "score", t)
    counts = {"loaded": len(bench.questions), "skipped_rows": len(bench.skipped),
              "unlabelled": len(bench.questions) - len(questions), "evaluated": len(questions),
              "samples": len(rollouts), "response_tokens": sum(len(r.response_ids) for r in rollouts),
              "truncated_samples": sum(r.truncated for r in rollouts)}
    report = build_report(settings_record(args, kind, runtime), metrics, benchmark_rows(metrics),
                          question_records(questions, results, rollouts, args.save_samples), counts, timing)
    write_json(report, out)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = args.out or default_out(args.model)
    try:
        report = run(args, out)
    except (EvalInputError, DataError, CheckpointError, LayoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_table(benchmark_rows(report["metrics"]), args.k)
    counts, timing = report["counts"], report["timing_s"]
    print(f"{counts['samples']} samples, {counts['response_tokens']} response tokens "
          f"({counts['truncated_samples']} cut at --max-tokens) generated in {timing['generate']:.1f}s; "
          f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
