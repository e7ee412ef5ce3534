"""`harmony-mcore <command> ...`: the project's entry point.

    train   Self-Harmony test-time RL:  harmony-mcore train --config configs/X.yaml [--resume] [key=value ...]
    demo    the embedded CPU default: warm-start, Self-Harmony vs majority voting, report
    eval    avg@k / maj@k / pass@k of a model (HF dir or mcore checkpoint) on a question file
    label   pseudo-labels of saved rollouts with any selector
    plan    check a layout and its per-GPU memory for a cluster (8B+ recipes)
    data    prepare benchmark files into the project's question format
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


def _train(argv: Sequence[str]) -> int:
    from harmony_mcore.config import ConfigError, load_config
    from harmony_mcore.train import train

    parser = argparse.ArgumentParser(prog="harmony-mcore train", description="Self-Harmony test-time RL")
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_intermixed_args(argv)  # options may come after overrides
    from harmony_mcore.data.errors import DataError
    from harmony_mcore.mcore.checkpoint import CheckpointError
    from harmony_mcore.mcore.parallel import LayoutError
    from harmony_mcore.cluster import WeightSyncFailed
    from harmony_mcore.train import ResumeError, StopRun

    try:
        cfg = load_config(args.config, args.overrides)
        return train(cfg, resume=args.resume)  # 0 done, 75 stopped by a signal with a checkpoint, 130 at once
    except (ConfigError, DataError, LayoutError, CheckpointError, ResumeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StopRun as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 1
    except WeightSyncFailed as e:  # a fault the trainer could not recover from; the message says what to do
        print(f"error: {e}", file=sys.stderr)
        return 1


def _demo(argv: Sequence[str]) -> int:
    from harmony_mcore.demo import main

    return main(argv)


def _eval(argv: Sequence[str]) -> int:
    from harmony_mcore.eval_cli import main

    return main(argv)


def _label(argv: Sequence[str]) -> int:
    from harmony_mcore.labels.cli import add_label_arguments, run_label

    parser = add_label_arguments(argparse.ArgumentParser(prog="harmony-mcore label",
                                                         description="pseudo-label saved rollouts"))
    return run_label(parser.parse_args(argv))


def _plan(argv: Sequence[str]) -> int:
    from harmony_mcore.plan import main

    return main(argv)


def _data(argv: Sequence[str]) -> int:
    from harmony_mcore.data.cli import main

    return main(argv)


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "train": _train, "demo": _demo, "eval": _eval, "label": _label, "plan": _plan, "data": _data,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
