"""Convert a Hugging Face checkpoint to a Megatron-Core dist checkpoint (torch_dist) that loads at any TP/PP.

    python tools/convert_hf_to_mcore.py --hf DIR --out DIR [--tp N --pp M] [--dtype float32|bfloat16]

Runs TP*PP local processes (gloo); each fills only its own shard. The output appears atomically.
Exit status: 0 on success; 2 with a one-line message for bad input (an option out of range, an HF directory
whose config or tensors cannot be used, a layout the model does not split into, an output that exists or
cannot be written), checked before any worker starts.
"""

from __future__ import annotations

import argparse
import sys
import time

from safetensors import SafetensorError

from harmony_mcore.dist import spawn_gloo
from harmony_mcore.mcore.convert import (
    DEFAULT_VOCAB_MULTIPLE,
    hf_to_mcore_worker,
    layout_message,
    out_dir_problem,
    preflight_hf_to_mcore,
    refuse,
)
from harmony_mcore.mcore.parallel import LayoutError

# What preflight raises for bad input: ArchError, WeightMismatchError, LayoutError, JSON errors (ValueError); a
# missing tensor or index field (KeyError); a missing directory or an existing output (OSError); a bad safetensors.
INPUT_ERRORS = (ValueError, KeyError, OSError, SafetensorError)


def option_problems(args: argparse.Namespace) -> list[str]:
    problems = [f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
                for name in ("tp", "pp", "vocab_multiple") if getattr(args, name) < 1]
    problems += [m for m in [out_dir_problem(args.out)] if m]
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="HF model directory (config.json, safetensors, tokenizer)")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: the HF config's dtype")
    p.add_argument("--vocab-multiple", type=int, default=DEFAULT_VOCAB_MULTIPLE,
                   help="pad the vocab to a multiple of this (TP-independent, so the checkpoint reshards)")
    args = p.parse_args(argv)
    problems = option_problems(args)
    if problems:
        return refuse("; ".join(problems))
    try:
        preflight_hf_to_mcore(args.hf, args.out, args.tp, args.pp, args.vocab_multiple)
    except INPUT_ERRORS as err:
        message = layout_message(err) if isinstance(err, LayoutError) else str(err)
        return refuse(message if args.hf in message or args.out in message else f"--hf {args.hf}: {message}")
    start = time.perf_counter()
    spawn_gloo(args.tp * args.pp, hf_to_mcore_worker, args.hf, args.out, args.tp, args.pp, args.dtype,
               args.vocab_multiple)
    print(f"wrote {args.out} (tp={args.tp}, pp={args.pp}) in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
