"""Benchmark checkpoint conversion: a random ~0.5B-parameter Qwen3 HF checkpoint to Megatron-Core and back.

    python tools/bench_convert.py [--tp 1 --pp 1] [--layers 16 --hidden 1024 ...] [--dtype bfloat16]

Builds the HF checkpoint (random weights, bf16 by default), then times, in one run:
  * HF -> mcore and mcore -> HF through the same worker functions and process launcher as
    tools/convert_hf_to_mcore.py / tools/convert_mcore_to_hf.py (spawn_gloo over TP x PP gloo processes);
  * the I/O floor: read every tensor of the same safetensors and write them all to a new safetensors file
    (the same bytes), in this process; measured --io-repeats times interleaved with the conversions, median.
The conversion figures are end to end (process start, imports and Megatron setup included, as a user sees them);
the wall and CPU time inside the worker function (after importing megatron.core; the slowest rank) are reported
too, and CPU time gives a second ratio that other tenants of a noisy machine cannot inflate. The round trip is
checked bit-exact (exit status 1 otherwise).
The last line is one JSON object with "ratio_to_io" = (HF->mcore + mcore->HF seconds) / (read + write seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _timed_worker(rank: int, world: int, which: str, *args) -> tuple[float, float]:
    """Run one conversion worker; returns the (wall, CPU) seconds spent inside it (imports done beforehand)."""
    import megatron.core  # noqa: F401 - import cost is not the worker's

    from harmony_mcore.mcore import convert

    fn = {"hf_to_mcore": convert.hf_to_mcore_worker, "mcore_to_hf": convert.mcore_to_hf_worker}[which]
    start, start_cpu = time.perf_counter(), time.process_time()
    fn(rank, world, *args)
    return time.perf_counter() - start, time.process_time() - start_cpu


def safetensors_files(hf_dir: Path) -> list[Path]:
    return sorted(hf_dir.glob("*.safetensors"))


def payload_bytes(hf_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in safetensors_files(hf_dir):
        with safe_open(path, "pt") as f:
            for name in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                sl = f.get_slice(name)
                shape, dtype = sl.get_shape(), sl.get_dtype()
                n = 1
                for d in shape:
                    n *= d
                total += n * {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4}.get(dtype, 4)
    return total


def io_roundtrip(hf_dir: Path, out_dir: Path) -> tuple[float, float]:
    """(wall, CPU) seconds to read every tensor of hf_dir's safetensors and write them (same bytes) into out_dir."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    start, start_cpu = time.perf_counter(), time.process_time()
    for path in safetensors_files(hf_dir):
        with safe_open(path, "pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        save_file(tensors, str(out_dir / path.name), metadata={"format": "pt"})
        del tensors
    seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    shutil.rmtree(out_dir)
    return seconds, cpu


def same_weights(a: Path, b: Path) -> bool:
    """Every HF tensor of a is present in b with identical bytes."""
    import torch

    from harmony_mcore.weights.hf_dir import HFWeights

    wa, wb = HFWeights(a), HFWeights(b)
    if wa.names() != wb.names():
        return False
    return all(torch.equal(wa.get(n), wb.get(n)) for n in sorted(wa.names()))


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    from harmony_mcore.tiny import add_shape_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    # The config vocab is 151936; the local tokenizer stays small.
    add_shape_args(p, layers=16, hidden=1024, heads=16, kv_heads=8, head_dim=64, ffn=3072, vocab=151936)
    p.add_argument("--io-repeats", type=int, default=3, help="I/O baseline runs (median), interleaved")
    p.add_argument("--workdir", default=None, help="parent of the temp directory (default: the system temp)")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    from harmony_mcore.dist import spawn_gloo
    from harmony_mcore.mcore.convert import (
        DEFAULT_SHARD_BYTES,
        DEFAULT_VOCAB_MULTIPLE,
        preflight_hf_to_mcore,
        preflight_mcore_to_hf,
    )
    from harmony_mcore.tiny import make_qwen3_from_args

    root = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.workdir))
    try:
        t = time.perf_counter()
        hf = make_qwen3_from_args(root / "hf", args, tied=False, dtype=args.dtype)
        nbytes = payload_bytes(hf)
        params = nbytes // (2 if args.dtype == "bfloat16" else 4)
        print(f"built Qwen3 HF checkpoint: {params / 1e6:.0f}M parameters, {args.dtype}, {nbytes / 1e9:.2f} GB "
              f"in {time.perf_counter() - t:.1f}s")
        world = args.tp * args.pp
        mcore, back = root / "mcore", root / "hf_back"
        io_runs = [io_roundtrip(hf, root / "io0")]

        preflight_hf_to_mcore(hf, mcore, args.tp, args.pp, DEFAULT_VOCAB_MULTIPLE)
        t = time.perf_counter()
        inner = spawn_gloo(world, _timed_worker, "hf_to_mcore", str(hf), str(mcore), args.tp, args.pp, None,
                           DEFAULT_VOCAB_MULTIPLE, timeout=1800)
        to_mcore = (time.perf_counter() - t, max(w for w, _ in inner), max(c for _, c in inner))
        if args.io_repeats > 1:
            io_runs.append(io_roundtrip(hf, root / "io1"))

        preflight_mcore_to_hf(mcore, back, args.tp, args.pp)
        t = time.perf_counter()
        inner = spawn_gloo(world, _timed_worker, "mcore_to_hf", str(mcore), str(back), args.tp, args.pp,
                           DEFAULT_SHARD_BYTES, timeout=1800)
        to_hf = (time.perf_counter() - t, max(w for w, _ in inner), max(c for _, c in inner))
        for i in range(2, args.io_repeats):
            io_runs.append(io_roundtrip(hf, root / f"io{i}"))

        exact = same_weights(hf, back)
        mcore_bytes = dir_bytes(mcore)
        io_s = statistics.median(w for w, _ in io_runs)
        io_cpu = statistics.median(c for _, c in io_runs)
        convert_s, convert_inner, convert_cpu = (a + b for a, b in zip(to_mcore, to_hf))
        gbps = lambda s: nbytes / s / 1e9

        print(f"layout tp={args.tp} pp={args.pp} ({world} gloo process{'es' if world > 1 else ''}); "
              f"mcore checkpoint on disk {mcore_bytes / 1e9:.2f} GB")
        for what, (wall, inside, cpu) in (("HF -> mcore", to_mcore), ("mcore -> HF", to_hf)):
            print(f"{what}:  {wall:7.2f} s end to end ({gbps(wall):.3f} GB/s); inside the worker {inside:.2f} s "
                  f"({gbps(inside):.3f} GB/s), {cpu:.2f} s CPU")
        print(f"I/O floor (read + write the same safetensors bytes): {io_s:.2f} s ({gbps(io_s):.2f} GB/s), "
              f"{io_cpu:.2f} s CPU; median of {[round(w, 2) for w, _ in io_runs]} s")
        print(f"conversion both ways / I/O floor: {convert_s / io_s:.1f}x end to end, "
              f"{convert_inner / io_s:.1f}x inside the workers, {convert_cpu / io_cpu:.1f}x in CPU time; "
              f"round trip bit-exact: {exact}")
        report = {
            "ratio_to_io": round(convert_s / io_s, 3),
            "ratio_to_io_in_worker": round(convert_inner / io_s, 3),
            "ratio_to_io_cpu": round(convert_cpu / io_cpu, 3),
            "hf_to_mcore_s": round(to_mcore[0], 3), "mcore_to_hf_s": round(to_hf[0], 3),
            "hf_to_mcore_worker_s": round(to_mcore[1], 3), "mcore_to_hf_worker_s": round(to_hf[1], 3),
            "hf_to_mcore_cpu_s": round(to_mcore[2], 3), "mcore_to_hf_cpu_s": round(to_hf[2], 3),
            "io_s": round(io_s, 3), "io_cpu_s": round(io_cpu, 3), "io_runs_s": [round(w, 3) for w, _ in io_runs],
            "hf_to_mcore_gbps": round(gbps(to_mcore[0]), 4), "mcore_to_hf_gbps": round(gbps(to_hf[0]), 4),
            "io_gbps": round(gbps(io_s), 3), "bytes": nbytes, "mcore_bytes_on_disk": mcore_bytes, "params": params,
            "dtype": args.dtype, "tp": args.tp, "pp": args.pp, "roundtrip_exact": exact,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(report))
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
