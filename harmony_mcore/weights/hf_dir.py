"""Reading and writing Hugging Face model directories (config, tokenizer files, safetensors shards)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files copied verbatim between HF directories (tokenizer, chat template, generation defaults).
METADATA_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
    "added_tokens.json",
)


class MissingTensorError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class HFWeights:
    """Lazy, read-only access to the safetensors tensors of an HF directory (one tensor in memory at a time)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.path / SINGLE_FILE).is_file():
            with safe_open(self.path / SINGLE_FILE, "pt") as f:
                weight_map = {name: SINGLE_FILE for name in f.keys()}
        else:
            raise FileNotFoundError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE}")
        self._file_of = weight_map
        self._handles: dict[str, object] = {}

    def names(self) -> set[str]:
        return set(self._file_of)

    def _handle(self, name: str):
        file = self._file_of.get(name)
        if file is None:
            raise MissingTensorError(f"{self.path}: tensor {name!r} is missing")
        if file not in self._handles:
            self._handles[file] = safe_open(self.path / file, "pt")
        return self._handles[file]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())


def copy_metadata(src: str | Path, dst: str | Path) -> None:
    """Copy config and tokenizer files (whatever of METADATA_FILES exists) from src to dst."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in METADATA_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def write_shard(path: str | Path, tensors: dict[str, torch.Tensor]) -> int:
    """Write one safetensors file; returns its payload bytes."""
    contiguous = {k: v.detach().contiguous() for k, v in tensors.items()}
    save_file(contiguous, str(path), metadata={"format": "pt"})
    # safetensors writes through a private temp file (mode 0600): give the shard the usual umask-based mode so
    # other users of a shared cluster (and containers running as another uid) can load the export.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return sum(t.numel() * t.element_size() for t in contiguous.values())


def write_index(out_dir: str | Path, weight_map: dict[str, str], total_bytes: int) -> None:
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(out_dir) / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


class BucketPlanner:
    """Cuts a stream of groups of (name, tensor) pairs into buckets of at most `max_bytes`, never splitting a
    group (a larger group gets a bucket of its own): vLLM's in-place reload needs every tensor of a layer in one
    call, and an HF shard keeps a layer together. The one bucketing of HF export and weight sync.

    Push-style, for senders that decide step by step when to flush: add(group) returns the bucket to send now
    (a list of (name, tensor)) or None; add(None) ends the stream and returns the last bucket (or None).
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._pending: list[tuple[str, torch.Tensor]] = []
        self._size = 0

    def add(self, group: list[tuple[str, torch.Tensor]] | None) -> list[tuple[str, torch.Tensor]] | None:
        if group is None:
            out, self._pending, self._size = self._pending, [], 0
            return out or None
        nbytes = sum(t.nbytes for _, t in group)
        if self._pending and self._size + nbytes > self.max_bytes:
            out, self._pending, self._size = self._pending, list(group), nbytes
            return out
        self._pending.extend(group)
        self._size += nbytes
        return None


def buckets(groups: Iterable[list[tuple[str, torch.Tensor]]], max_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    """The BucketPlanner's buckets of an iterable of groups, as dicts."""
    planner = BucketPlanner(max_bytes)
    for group in groups:
        if (bucket := planner.add(group)) is not None:
            yield dict(bucket)
    if (bucket := planner.add(None)) is not None:
        yield dict(bucket)
