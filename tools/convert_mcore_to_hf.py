"""Export a harmony_mcore / Megatron-Core checkpoint to a Hugging Face safetensors directory.

    python tools/convert_mcore_to_hf.py --mcore DIR --out DIR [--tp N --pp M] [--shard-gb 2]

The result (config, tokenizer files, safetensors shards + index) loads in transformers and vLLM. With --tp/--pp
the checkpoint is loaded sharded over TP*PP local processes and every pipeline stage writes its own files.
Exit status: 0 on success; 2 with a one-line message for bad input (an option out of range, a directory that is
no complete checkpoint, e.g. an unfinished `<dir>.partial`, a damaged harmony.json, a layout the model does not
split into, an output that exists or cannot be written), checked before any worker starts.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from harmony_mcore.dist import spawn_gloo
from harmony_mcore.fsutil import PARTIAL_SUFFIX
from harmony_mcore.mcore.checkpoint import META_FILE, CheckpointError
from harmony_mcore.mcore.convert import (
    layout_message,
    mcore_to_hf_worker,
    out_dir_problem,
    preflight_mcore_to_hf,
    refuse,
)
from harmony_mcore.mcore.parallel import LayoutError


def option_problems(args: argparse.Namespace) -> list[str]:
    problems = [f"--{name} must be >= 1, got {getattr(args, name)}" for name in ("tp", "pp") if getattr(args, name) < 1]
    if not (math.isfinite(args.shard_gb) and args.shard_gb > 0):
        problems.append(f"--shard-gb must be a finite number > 0, got {args.shard_gb}")
    if Path(args.mcore).name.endswith(PARTIAL_SUFFIX):
        problems.append(f"--mcore {args.mcore}: an unfinished write ({PARTIAL_SUFFIX}), not a complete checkpoint")
    problems += [m for m in [out_dir_problem(args.out)] if m]
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mcore", required=True, help="checkpoint directory (with harmony.json and dist/)")
    p.add_argument("--out", required=True, help="output HF directory (must not exist)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--shard-gb", type=float, default=2.0, help="max size of one safetensors file")
    args = p.parse_args(argv)
    problems = option_problems(args)
    if problems:
        return refuse("; ".join(problems))
    try:
        preflight_mcore_to_hf(args.mcore, args.out, args.tp, args.pp)
    except LayoutError as err:
        return refuse(layout_message(err))
    except (CheckpointError, OSError) as err:  # not a (complete) checkpoint; the output exists
        return refuse(str(err))
    except (ValueError, KeyError, TypeError) as err:  # fields of a damaged harmony.json
        return refuse(f"{Path(args.mcore) / META_FILE} is damaged ({type(err).__name__}: {err})")
    start = time.perf_counter()
    spawn_gloo(args.tp * args.pp, mcore_to_hf_worker, args.mcore, args.out, args.tp, args.pp,
               int(args.shard_gb * 1024**3))
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
