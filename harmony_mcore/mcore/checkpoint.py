"""Megatron dist_checkpointing (torch_dist) checkpoints, written atomically, loadable at any TP/PP.

Directory layout of a model checkpoint (what tools/convert_hf_to_mcore.py writes; training checkpoints add their
optimizer/scheduler/RNG/data state to the same `dist/` and `harmony.json`):
    <dir>/harmony.json   format version, ArchSpec, padded vocab, dtype (+ training state for training checkpoints)
    <dir>/hf/            config.json and tokenizer files of the source HF model (for export and vLLM)
    <dir>/dist/          Megatron dist_checkpointing directory (layer-stacked, TP/PP-independent keys): the weights
                         under "model"; training checkpoints add "optimizer", "scheduler" and "rng".
    <dir>/manifest.json  size and CRC-32 of every other file of the directory, written last (`verify` below)
All ranks write into `<dir>.partial`; rank 0 renames it to `<dir>` after every rank finished.

The manifest makes damage that happens after the write visible before anything loads (a truncated copy, a full
disk during a later rsync, a hand-edited harmony.json): `verify` re-reads every file and compares. Each rank
checksums the `dist/__<rank>_*.distcp` shards it wrote itself (still in its page cache), rank 0 everything else,
so the cost is one read per byte at memory speed, spread over the ranks (measured: docs/reliability.md). CRC-32
(zlib, ~3 GB/s on one core) finds truncation and accidental corruption, not deliberate tampering. Checkpoints
written before manifests existed have none: `verify` says so and the caller decides (the trainer accepts them
with a warning).

Sharded state dicts are built as Megatron-LM 0.16's own training loop builds them
(megatron/training/checkpointing.py): ONE metadata dict (`sharded_metadata`) goes to the model's and to the
optimizer's `sharded_state_dict`, is stored in the checkpoint as its `content_metadata` (less the process group),
and is read back (`content_metadata`) before the state dict to load into is built, so a load always asks for what
was saved. The DistributedOptimizer state is written in Megatron's `fully_reshardable` format: the Adam moments and
fp32 master weights in model-parameter space, so a run resumes at another TP, PP or DP. The price, Megatron's: the
state of each model-parallel shard is gathered (over the gloo DP group) on its DP rank 0 at save time, and every
rank allocates that whole shard's state in host memory while loading (12 bytes per parameter / (TP * PP)).

Loads tolerate exactly one kind of absence: TransformerEngine's per-layer `_extra_state` (FP8 scaling metadata),
which a local-spec checkpoint (tools/convert_hf_to_mcore.py writes those) does not hold; TE layers then keep their
defaults. Any other entry the model or optimizer needs and the checkpoint lacks is an error naming it.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from harmony_mcore import fsutil
from harmony_mcore.weights import hf_dir
from harmony_mcore.weights.arch import ArchSpec

FORMAT_VERSION = 1
META_FILE = "harmony.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 16 * 2**20  # bytes read per CRC update
_THREADS = 4  # files checksummed at once by one process
_SHARD = re.compile(r"^__(\d+)_\d+\.distcp$")  # torch_dist's shard files: __<writer rank>_<n>.distcp
OPTIMIZER_FORMAT = "fully_reshardable"  # Megatron's DistributedOptimizer checkpoint format (see above)
RESHARDABLE_FORMATS = ("fully_reshardable",)  # formats that load at another TP/PP
OPTIONAL_SUFFIX = "._extra_state"  # TransformerEngine layer metadata: may be absent from a checkpoint


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not fit the model it is loaded into."""


@dataclass(frozen=True)
class CheckpointMeta:
    arch: ArchSpec
    padded_vocab_size: int
    dtype: str
    extra: dict[str, Any] = field(default_factory=dict)  # training state: step, data cursor, config hash, ...

    def to_json(self) -> str:
        return json.dumps({"format_version": FORMAT_VERSION, "arch": self.arch.to_dict(),
                           "padded_vocab_size": self.padded_vocab_size, "dtype": self.dtype,
                           "extra": self.extra}, indent=2, sort_keys=True) + "\n"


def read_meta(ckpt_dir: str | Path) -> CheckpointMeta:
    path = Path(ckpt_dir) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir}: not a harmony_mcore checkpoint (no {META_FILE})")
    d = json.loads(path.read_text())
    if d.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {d.get('format_version')} != {FORMAT_VERSION}")
    return CheckpointMeta(ArchSpec.from_dict(d["arch"]), int(d["padded_vocab_size"]), d["dtype"], d.get("extra", {}))


def check_compatible(meta: CheckpointMeta, arch: ArchSpec, padded_vocab: int, where: str) -> None:
    """Refuse a checkpoint whose architecture differs from the model being built, naming each field."""
    diffs = [f"{k}: checkpoint {v!r} != model {getattr(arch, k)!r}"
             for k, v in meta.arch.to_dict().items() if getattr(arch, k) != v]
    if meta.padded_vocab_size != padded_vocab:
        diffs.append(f"padded_vocab_size: checkpoint {meta.padded_vocab_size} != model {padded_vocab}")
    if diffs:
        raise CheckpointError(f"{where}: checkpoint does not match the model: " + "; ".join(diffs))


def sharded_metadata(optimizer_format: str = OPTIMIZER_FORMAT) -> dict[str, Any]:
    """The metadata every `sharded_state_dict` call of one save or load receives, model and optimizer alike
    (after parallel state is initialised)."""
    from megatron.core import parallel_state as ps

    return {"distrib_optim_sharding_type": optimizer_format,
            # Megatron's gloo gather to DP rank 0: one host copy of the optimizer state per model-parallel shard
            "distrib_optim_fully_reshardable_mem_efficient": True,
            "singleton_local_shards": False, "chained_optim_avoid_prefix": True,
            "dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}


def content_metadata(ckpt_dir: str | Path) -> dict[str, Any] | None:
    """The sharded-state metadata a checkpoint was written with (None: written before it was recorded)."""
    from megatron.core import dist_checkpointing

    dist_dir = Path(ckpt_dir) / "dist"
    if not dist_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: incomplete checkpoint (no dist/ directory)")
    return dist_checkpointing.load_content_metadata(str(dist_dir))


def resume_metadata(ckpt_dir: str | Path, same_layout: bool) -> dict[str, Any]:
    """The metadata to build the training state to load from `ckpt_dir` with: the one it was saved with.
    Refuses a checkpoint without optimizer metadata, and a TP/PP change for a format that cannot reshard."""
    saved = content_metadata(ckpt_dir)
    if not saved or "distrib_optim_sharding_type" not in saved:
        raise CheckpointError(f"{ckpt_dir}: no distributed-optimizer state recorded (a model-only checkpoint, or "
                              "one written by an older version): start from it with model.mcore_path instead")
    fmt = saved["distrib_optim_sharding_type"]
    if not same_layout and fmt not in RESHARDABLE_FORMATS:
        raise CheckpointError(f"{ckpt_dir}: optimizer state in format {fmt!r} only loads at the TP/PP it was "
                              f"written at (reshardable: {', '.join(RESHARDABLE_FORMATS)})")
    return sharded_metadata(fmt) | {k: v for k, v in saved.items() if k in _RECORDED}


_RECORDED = ("distrib_optim_sharding_type", "singleton_local_shards", "chained_optim_avoid_prefix")


def save(ckpt_dir: str | Path, sharded_state_dict: dict, meta: CheckpointMeta, *, hf_meta_src: str | Path | None,
         overwrite: bool = False, metadata: dict[str, Any] | None = None) -> Path:
    """Collective: every rank passes its sharded state dict (built with `metadata`, stored as the checkpoint's
    content metadata); the directory appears complete or not at all."""
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    rank0 = dist.get_rank() == 0
    error: list[BaseException | None] = [None]
    if rank0:
        try:
            fsutil.begin_atomic_dir(ckpt_dir, overwrite=overwrite)
        except BaseException as e:  # noqa: BLE001 - re-raised on every rank below
            error[0] = e
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise error[0]
    tmp = fsutil.partial_path(ckpt_dir)
    try:
        if rank0:
            (tmp / "dist").mkdir()
        dist.barrier()
        recorded = {k: v for k, v in (metadata or {}).items() if k in _RECORDED}
        dist_checkpointing.save(sharded_state_dict, str(tmp / "dist"), content_metadata=recorded or None)
        if rank0:
            if hf_meta_src is not None:
                hf_dir.copy_metadata(hf_meta_src, tmp / "hf")
            (tmp / META_FILE).write_text(meta.to_json())
        dist.barrier()
        _write_manifest(tmp)
    except BaseException:
        if rank0:
            fsutil.abort_atomic_dir(ckpt_dir)
        raise
    if rank0:
        fsutil.commit_atomic_dir(ckpt_dir)
    dist.barrier()
    return ckpt_dir


# --- manifest: sizes and checksums of every file, written at save time, checked before a resume ------------


def file_digest(path: str | Path) -> dict[str, int | str]:
    """{"bytes", "crc32"} of a file, read in chunks into one buffer (constant memory)."""
    crc, size, buf = 0, 0, bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
            size += n
    return {"bytes": size, "crc32": f"{crc:08x}"}


def _digests(root: Path, rels: list[str], threads: int = _THREADS) -> dict[str, dict]:
    """file_digest of each file, `threads` at a time (zlib and file reads release the GIL)."""
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(rels)))) as pool:
        return dict(zip(rels, pool.map(lambda rel: file_digest(root / rel), rels)))


def _files(root: Path) -> list[str]:
    """Every file under root except the manifest, as sorted POSIX paths relative to root."""
    out = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            rel = Path(dirpath, name).relative_to(root).as_posix()
            if rel != MANIFEST_FILE:
                out.append(rel)
    return sorted(out)


def _checksummed_by(rel: str, world: int) -> int:
    """The rank that checksums a file at save time: a dist shard's writer, rank 0 for everything else."""
    m = _SHARD.match(rel.rsplit("/", 1)[-1])
    return int(m.group(1)) if m and rel.startswith("dist/") and int(m.group(1)) < world else 0


def _write_manifest(tmp: Path) -> None:
    """Collective, after every rank wrote its part of `tmp`: the manifest of every file in it."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = _digests(tmp, [rel for rel in _files(tmp) if _checksummed_by(rel, world) == rank])
    gathered: list[dict | None] = [None] * world if rank == 0 else []
    dist.gather_object(mine, gathered if rank == 0 else None, dst=0)
    if rank == 0:
        write_manifest(tmp, {rel: digest for part in gathered for rel, digest in (part or {}).items()})
    dist.barrier()


def write_manifest(ckpt_dir: str | Path, digests: dict[str, dict] | None = None) -> Path:
    """Write `<ckpt_dir>/manifest.json` from the digests of its files (computed here, in this process, when not
    given: tools and tests)."""
    root = Path(ckpt_dir)
    if digests is None:
        digests = _digests(root, _files(root))
    manifest = {"manifest_version": MANIFEST_VERSION, "files": dict(sorted(digests.items()))}
    (root / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    return root / MANIFEST_FILE


@dataclass(frozen=True)
class Verification:
    """What `verify` found. problems: one line per damaged file ("dist/__0_0.distcp: 1,024 bytes, the manifest
    says 4,096"); verified: False when the checkpoint has no manifest (written before manifests existed)."""

    problems: tuple[str, ...]
    verified: bool

    @property
    def intact(self) -> bool:
        return not self.problems


def verify(ckpt_dir: str | Path, threads: int = _THREADS) -> Verification:
    """Check a complete checkpoint before anything loads it: harmony.json must parse, and every file of the
    manifest must exist with its recorded size and CRC-32 (sizes first: a truncated file costs no read). Files
    are read by `threads` threads (zlib releases the GIL). Never raises for damage: it is reported."""
    root = Path(ckpt_dir)
    problems: list[str] = []
    try:
        read_meta(root)
    except (OSError, ValueError, KeyError, TypeError) as e:  # CheckpointError, JSONDecodeError, a missing field
        problems.append(f"{META_FILE}: damaged ({type(e).__name__}: {e})")
    reported = {META_FILE} if problems else set()  # named once, as unreadable
    if not (root / MANIFEST_FILE).is_file():
        return Verification(tuple(problems), verified=False)
    try:
        files = json.loads((root / MANIFEST_FILE).read_text())["files"]
        expected = {str(rel): (int(d["bytes"]), str(d["crc32"])) for rel, d in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return Verification((*problems, f"{MANIFEST_FILE}: damaged ({type(e).__name__}: {e})"), verified=True)
    to_read = []
    for rel, (size, _) in expected.items():
        path = root / rel
        if rel in reported:
            continue
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != size:
            problems.append(f"{rel}: {path.stat().st_size:,} bytes, the manifest says {size:,} (truncated or "
                            "overwritten)")
        else:
            to_read.append(rel)
    for rel, digest in _digests(root, to_read, threads).items():
        if digest["crc32"] != expected[rel][1]:
            problems.append(f"{rel}: checksum {digest['crc32']} != {expected[rel][1]} in the manifest "
                            "(the content changed)")
    return Verification(tuple(problems), verified=True)


def load(ckpt_dir: str | Path, sharded_state_dict: dict) -> dict:
    """Load into the given sharded state dict (any TP/PP: Megatron reshards). Entries the state dict asks for
    and the checkpoint lacks are refused by name, except TransformerEngine `_extra_state` (module docstring)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    dist_dir = Path(ckpt_dir) / "dist"
    if not dist_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: incomplete checkpoint (no dist/ directory)")
    # "unexpected" in Megatron's terms: requested here, absent from the checkpoint (dropped from the load)
    loaded, _, absent = dist_checkpointing.load(sharded_state_dict, str(dist_dir), strict=StrictHandling.RETURN_ALL)
    needed = sorted(k for k in absent if not k.endswith(OPTIONAL_SUFFIX))
    if needed:
        raise CheckpointError(f"{ckpt_dir}: checkpoint lacks {len(needed)} entries this model needs, e.g. "
                              + ", ".join(needed[:3]))
    return loaded


def load_model_state(model, state: dict, where: str | Path) -> None:
    """`model.load_state_dict` of a loaded "model" entry, allowing only TE `_extra_state` to be absent."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(OPTIONAL_SUFFIX.lstrip("."))]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{where}: model state does not match the model: missing {missing[:3]}, "
                              f"unexpected {result.unexpected_keys[:3]}")


def save_model(ckpt_dir: str | Path, model, meta: CheckpointMeta, *, hf_meta_src: str | Path | None,
               overwrite: bool = False) -> Path:
    """A model-only checkpoint: the weights under "model", as in training checkpoints."""
    metadata = sharded_metadata()
    return save(ckpt_dir, {"model": model.sharded_state_dict(metadata=metadata)}, meta, hf_meta_src=hf_meta_src,
                overwrite=overwrite, metadata={k: v for k, v in metadata.items() if k != "distrib_optim_sharding_type"})


def load_model(ckpt_dir: str | Path, model, arch: ArchSpec, padded_vocab: int) -> CheckpointMeta:
    """Load model weights from a model-only or training checkpoint, after checking it was written for this
    architecture."""
    meta = read_meta(ckpt_dir)
    check_compatible(meta, arch, padded_vocab, str(ckpt_dir))
    state = load(ckpt_dir, {"model": model.sharded_state_dict(metadata=sharded_metadata())})
    load_model_state(model, state["model"], ckpt_dir)
    return meta
