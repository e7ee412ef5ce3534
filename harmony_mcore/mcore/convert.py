"""HF <-> Megatron-Core checkpoint conversion, one process per TP x PP rank (gloo), through the shared table.

`hf_to_mcore_worker` and `mcore_to_hf_worker` run on every rank (tools/ spawn them); each rank touches only its
own shard, so an 8B+ model converts with TP*PP processes without any rank holding the whole model.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from harmony_mcore import fsutil
from harmony_mcore.mcore import checkpoint, parallel
from harmony_mcore.mcore.hf_weights import iter_hf_groups, load_hf_weights
from harmony_mcore.mcore.model import DTYPES, build_gpt
from harmony_mcore.weights import hf_dir
from harmony_mcore.weights.arch import ArchSpec
from harmony_mcore.weights.validate import validate_hf_dir

DEFAULT_VOCAB_MULTIPLE = 128
DEFAULT_SHARD_BYTES = 2 * 1024**3


def hf_dtype(hf_config: dict) -> str:
    """The checkpoint dtype named by an HF config ("torch_dtype" or transformers 5's "dtype")."""
    name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    if name not in DTYPES:
        raise ValueError(f"config.dtype: {name!r} is not supported (float32 or bfloat16)")
    return name


def check_output_dir(out: str | Path) -> None:
    if Path(out).exists():
        raise FileExistsError(f"{out}: output directory already exists (refusing to overwrite)")


def preflight_hf_to_mcore(hf_path: str | Path, out: str | Path, tp: int, pp: int, vocab_multiple: int) -> ArchSpec:
    """Everything that can be checked before starting workers: config, tensor names and shapes, layout, output."""
    check_output_dir(out)
    arch = validate_hf_dir(hf_path)
    hf_dtype(json.loads((Path(hf_path) / "config.json").read_text()))
    parallel.check_layout(arch, tp=tp, pp=pp, padded_vocab=arch.padded_vocab_size(vocab_multiple))
    return arch


def preflight_mcore_to_hf(mcore_path: str | Path, out: str | Path, tp: int, pp: int) -> ArchSpec:
    check_output_dir(out)
    meta = checkpoint.read_meta(mcore_path)
    if not (Path(mcore_path) / "dist").is_dir():
        raise checkpoint.CheckpointError(f"{mcore_path}: incomplete checkpoint (no dist/ directory)")
    parallel.check_layout(meta.arch, tp=tp, pp=pp, padded_vocab=meta.padded_vocab_size)
    return meta.arch


def hf_to_mcore_worker(rank: int, world: int, hf_path: str, out: str, tp: int, pp: int,
                       dtype: str | None, vocab_multiple: int) -> None:
    """Build this rank's shard at (tp, pp), fill it from the HF checkpoint, save collectively.

    world may exceed tp*pp: the extra ranks are data-parallel replicas (Megatron saves one copy)."""
    arch = ArchSpec.from_hf_dir(hf_path)
    dtype = dtype or hf_dtype(json.loads((Path(hf_path) / "config.json").read_text()))
    padded = arch.padded_vocab_size(vocab_multiple)
    parallel.check_layout(arch, tp=tp, pp=pp, world=world, padded_vocab=padded)
    parallel.init_parallel(tp, pp, device="cpu")
    model = build_gpt(arch, padded, dtype=dtype, spec="local", init_weights=False)
    load_hf_weights(model, hf_dir.HFWeights(hf_path), arch, padded)
    meta = checkpoint.CheckpointMeta(arch, padded, dtype, {"source": str(Path(hf_path).resolve())})
    checkpoint.save_model(out, model, meta, hf_meta_src=hf_path)


def mcore_to_hf_worker(rank: int, world: int, mcore_path: str, out: str, tp: int, pp: int,
                       shard_bytes: int) -> None:
    """Load the checkpoint at (tp, pp) and write it as an HF directory (see write_hf_dir)."""
    meta = checkpoint.read_meta(mcore_path)
    parallel.check_layout(meta.arch, tp=tp, pp=pp, world=world, padded_vocab=meta.padded_vocab_size)
    parallel.init_parallel(tp, pp, device="cpu")
    model = build_gpt(meta.arch, meta.padded_vocab_size, dtype=meta.dtype, spec="local", init_weights=False)
    checkpoint.load_model(mcore_path, model, meta.arch, meta.padded_vocab_size)
    write_hf_dir(model, meta.arch, meta.dtype, out, hf_meta_src=Path(mcore_path) / "hf", shard_bytes=shard_bytes)


def write_hf_dir(model, arch: ArchSpec, dtype: str, out: str | Path, *, hf_meta_src: str | Path,
                 shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Collective over the world: every pipeline stage's TP rank 0 (of DP replica 0) writes its own safetensors
    files; rank 0 adds config, tokenizer files and the index, then renames the directory into place."""
    from megatron.core import parallel_state as ps

    rank, world = dist.get_rank(), dist.get_world_size()
    status: list[BaseException | None] = [None]
    if rank == 0:
        try:
            fsutil.begin_atomic_dir(out)
        except BaseException as e:  # noqa: BLE001 - re-raised on every rank
            status[0] = e
    dist.broadcast_object_list(status, src=0)
    if status[0] is not None:
        raise status[0]
    tmp = fsutil.partial_path(out)
    stage = ps.get_pipeline_model_parallel_rank()
    weight_map: dict[str, str] = {}
    total = 0
    if ps.get_data_parallel_rank() == 0:  # other data-parallel replicas hold the same weights
        for k, bucket in enumerate(hf_dir.buckets(iter_hf_groups(model, arch), shard_bytes)):
            file = f"model-pp{stage:03d}-{k:05d}.safetensors"
            total += hf_dir.write_shard(tmp / file, bucket)
            weight_map.update(dict.fromkeys(bucket, file))
    maps: list = [None] * world
    dist.all_gather_object(maps, (weight_map, total))
    if rank == 0:
        merged = {name: file for m, _ in maps for name, file in m.items()}
        hf_dir.write_index(tmp, merged, sum(t for _, t in maps))
        hf_dir.copy_metadata(hf_meta_src, tmp)
        config = json.loads((tmp / "config.json").read_text())
        config["dtype"] = dtype
        config.pop("torch_dtype", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        fsutil.commit_atomic_dir(out)
    dist.barrier()


def parity_worker(rank: int, world: int, hf_path: str, mcore_path: str, tp: int, pp: int,
                  batch: int, seq_len: int, seed: int) -> float | None:
    """Max |logits_megatron - logits_transformers| over a random token batch (fp32), on the last stage's TP rank 0.

    Padded vocab rows are excluded (transformers has none).
    """
    meta = checkpoint.read_meta(mcore_path)
    arch = meta.arch
    parallel.init_parallel(tp, pp, device="cpu")
    from megatron.core import parallel_state as ps

    from harmony_mcore.mcore.forward import forward_logits

    model = build_gpt(arch, meta.padded_vocab_size, dtype="float32", init_weights=False)
    checkpoint.load_model(mcore_path, model, arch, meta.padded_vocab_size)
    model.eval()
    tokens = torch.randint(0, arch.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    logits = forward_logits(model, tokens)
    if logits is None or ps.get_tensor_model_parallel_rank() != 0:
        return None
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(hf_path, dtype=torch.float32)
    with torch.no_grad():
        ref = hf_model(tokens).logits  # (B, S, vocab)
    return (logits[..., : arch.vocab_size].float().cpu() - ref).abs().max().item()


# --- the tools' command lines (tools/convert_*.py): refusals as one line, exit 2 ----------------------------


def out_dir_problem(out: str) -> str | None:
    """Why --out cannot be created, or None."""
    path = Path(out).absolute()
    existing = next(p for p in path.parents if p.exists())
    if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        return f"--out {out}: cannot be created ({existing} is not a writable directory)"
    return None


def refuse(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def layout_message(err: Exception) -> str:
    """A layout error in the tools' own option names."""
    return str(err).replace("parallel.tp=", "--tp ").replace("parallel.pp=", "--pp ")
