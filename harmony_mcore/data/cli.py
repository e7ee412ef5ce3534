"""`harmony-mcore data ...` (also `python -m harmony_mcore.data.cli ...`).

    prepare    convert a benchmark file to the project JSONL format
               --source math500 --input test.jsonl --output data/math500.jsonl
    synthetic  write the procedural arithmetic task of the CPU demo (warm.jsonl, test.jsonl)
               --output-dir data/synthetic --seed 0 --n-warm 2000 --n-test 200

Exit status: 0 on success; 2 with a one-line message on stderr for bad input (a data error naming the file,
row and field; a bad option value; an output that cannot be written) and for a usage error (argparse).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeAlias

from harmony_mcore.data.errors import DataError
from harmony_mcore.data.formats import FORMATS
from harmony_mcore.data.loader import AUTO, read_questions
from harmony_mcore.data.project import write_questions
from harmony_mcore.data.synthetic import OPS, STRATEGIES, Difficulty, make_task, write_task

MAX_REPORTED_SKIPS = 5

_Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"  # not subscriptable at runtime
Command = Callable[[argparse.Namespace], int]


def _add_prepare(subparsers: _Subparsers) -> None:
    sources = "; ".join(f"{fmt.name}: {fmt.description}" for fmt in FORMATS)
    parser = subparsers.add_parser(
        "prepare",
        help="convert a benchmark file to the project JSONL format",
        description=f"Convert a local data file to the project JSONL format. Sources: {sources}.",
    )
    parser.add_argument("--source", default=AUTO, choices=(AUTO, *(fmt.name for fmt in FORMATS)))
    parser.add_argument("--input", required=True, type=Path, help="file, or directory from save_to_disk")
    parser.add_argument("--output", required=True, type=Path, help="project-format .jsonl to write")
    parser.add_argument("--split", help="split of a saved DatasetDict (default: test, or the only one)")
    parser.add_argument("--skip-bad-rows", action="store_true", help="skip invalid rows, report how many")
    parser.add_argument("--choice-seed", type=int, default=0, help="seed of the fixed choice shuffle (GPQA)")
    parser.set_defaults(run=_run_prepare)


def _add_synthetic(subparsers: _Subparsers) -> None:
    defaults = Difficulty()
    parser = subparsers.add_parser("synthetic", help="write the procedural arithmetic task (CPU demo)")
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-warm", type=int, default=2000, help="warm-start (SFT) examples")
    parser.add_argument("--n-test", type=int, default=200, help="test-time questions")
    for name in ("min_steps", "max_steps", "max_start", "max_operand", "max_factor", "max_value"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--ops", default=",".join(defaults.ops), help=f"comma-separated subset of {OPS}")
    parser.add_argument(
        "--strategies", default=",".join(STRATEGIES), help=f"comma-separated subset of {list(STRATEGIES)}"
    )
    parser.set_defaults(run=_run_synthetic)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harmony-mcore data", description="Prepare question files.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_prepare(subparsers)
    _add_synthetic(subparsers)
    return parser


def _run_prepare(args: argparse.Namespace) -> int:
    result = read_questions(
        args.input,
        source=args.source,
        split=args.split,
        skip_bad_rows=args.skip_bad_rows,
        choice_seed=args.choice_seed,
    )
    count = write_questions(result.questions, args.output)
    print(f"wrote {count} questions ({result.source}) from {args.input} to {args.output}")
    if result.skipped:
        print(f"skipped {len(result.skipped)} bad rows:", file=sys.stderr)
        for error in result.skipped[:MAX_REPORTED_SKIPS]:
            print(f"  {error}", file=sys.stderr)
        if len(result.skipped) > MAX_REPORTED_SKIPS:
            print(f"  ... and {len(result.skipped) - MAX_REPORTED_SKIPS} more", file=sys.stderr)
    return 0


def _split_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _run_synthetic(args: argparse.Namespace) -> int:
    difficulty = Difficulty(
        min_steps=args.min_steps,
        max_steps=args.max_steps,
        max_start=args.max_start,
        max_operand=args.max_operand,
        max_factor=args.max_factor,
        max_value=args.max_value,
        ops=_split_list(args.ops),  # type: ignore[arg-type]  # validated by Difficulty
    )
    task = make_task(
        args.seed, args.n_warm, args.n_test, difficulty=difficulty, strategies=_split_list(args.strategies)
    )
    warm_path, test_path = write_task(task, args.output_dir)
    print(f"wrote {len(task.warm)} warm-start examples to {warm_path}")
    print(f"wrote {len(task.test)} test-time questions to {test_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run a data subcommand; returns the exit status."""
    args = build_parser().parse_args(argv)
    run: Command = args.run
    try:
        return run(args)
    except (DataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the output file or directory
        output = getattr(args, "output", None) or getattr(args, "output_dir", None)
        where = f" ({error.filename})" if error.filename and str(error.filename) != str(output) else ""
        print(f"error: cannot write {output}: {error.strerror or error}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
