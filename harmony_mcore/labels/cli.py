"""`harmony-mcore label`: pseudo-label saved rollouts offline, to compare selectors.

    harmony-mcore label --input samples.jsonl --strategy harmonic [--lambda 1.0] --output labels.jsonl
    python -m harmony_mcore.labels.cli label --input samples.jsonl --output labels.jsonl

File formats: `harmony_mcore.labels.io`. Prints the label diagnostics (one `name value` per line). Exit status
0, or 2 with a one-line error for a bad input row (naming file, line and field) or a bad option.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from harmony_mcore.labels.answers import ANSWER_TYPES
from harmony_mcore.labels.config import STRATEGIES, LabelConfig
from harmony_mcore.labels.io import read_samples, write_labels
from harmony_mcore.labels.reduce import label_batch


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _weights(text: str) -> list[float]:
    try:
        return [float(part) for part in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_label_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `label` subcommand's options (for the top-level `harmony-mcore` parser to reuse); sets func."""
    defaults = LabelConfig()
    parser.add_argument("--input", required=True, help="rollouts, JSON lines")
    parser.add_argument("--output", required=True, help="labels, JSON lines (one per question)")
    parser.add_argument("--strategy", choices=STRATEGIES, default=defaults.strategy)
    parser.add_argument(
        "--lambda",
        dest="lam",
        type=float,
        default=defaults.lam,
        help="power_mean: exponent 1 - lambda; penalized_mean: AM - lambda * disagreement",
    )
    parser.add_argument(
        "--prior-pi", type=float, default=defaults.prior_pi, help="prior strategy: weight of view 0"
    )
    parser.add_argument("--smoothing", type=float, default=defaults.smoothing, help="Laplace pseudo-count")
    parser.add_argument("--views", type=_names, default=defaults.views, help="comma-separated, view 0 first")
    parser.add_argument(
        "--view-weights", type=_weights, default=None, help="comma-separated (default: all 1)"
    )
    parser.add_argument("--majority-view", default=defaults.majority_view)
    parser.add_argument(
        "--answer-type", choices=ANSWER_TYPES, default="math", help="for rows without an answer_type field"
    )
    parser.add_argument(
        "--verify-timeout",
        type=int,
        default=defaults.verify_timeout_s,
        help="seconds per math-verify parse or comparison",
    )
    parser.set_defaults(func=run_label)
    return parser


def _writable(path: str) -> bool:
    """A file can be created (or replaced) at path: its directory exists and is writable, it is no directory."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    return not target.is_dir() and parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)


def _fail(kind: str, err: Exception | str) -> int:
    print(f"harmony-mcore label: {kind}: {err}", file=sys.stderr)
    return 2


def run_label(args: argparse.Namespace) -> int:
    """Label the input file, write the labels, print the diagnostics."""
    try:
        cfg = LabelConfig(
            strategy=args.strategy,
            views=args.views,
            view_weights=args.view_weights or [1.0] * len(args.views),
            lam=args.lam,
            prior_pi=args.prior_pi,
            majority_view=args.majority_view,
            smoothing=args.smoothing,
            verify_timeout_s=args.verify_timeout,
        )
    except ValueError as err:
        return _fail("bad option", err)
    if not _writable(args.output):
        return _fail("bad option", f"--output {args.output}: cannot write there")
    try:
        samples = read_samples(args.input, cfg.views, args.answer_type)
        labels = label_batch(samples, cfg)  # ValueError: inconsistent questions (answer types, ground truths)
    except (ValueError, OSError) as err:
        return _fail("bad input", err)
    try:
        write_labels(args.output, labels)
    except OSError as err:
        return _fail("cannot write", f"--output {args.output}: {err.strerror or err}")
    print(
        f"labelled {len(labels.questions)} questions from {len(samples)} samples with {labels.strategy} "
        f"-> {args.output}"
    )
    width = max(map(len, labels.diagnostics))
    for name, value in labels.diagnostics.items():
        print(f"{name:<{width}}  {value:.4f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: `main(["label", "--input", ...])`."""
    parser = argparse.ArgumentParser(prog="harmony-mcore", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    add_label_arguments(commands.add_parser("label", help="pseudo-label saved rollouts"))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
