"""Layout of a run directory, and the checkpoints in it.

    <run_dir>/config.yaml          the resolved config
    <run_dir>/metrics.jsonl        one JSON object per step (eval rows carry "eval/..." keys)
    <run_dir>/tb/                  TensorBoard event files
    <run_dir>/checkpoints/step_00000010/   complete checkpoints (harmony_mcore.mcore.checkpoint layout)
    <run_dir>/checkpoints/step_00000020.partial/   an interrupted write: never picked up, removed on the next save
    <run_dir>/checkpoints/step_00000030.damaged/   a checkpoint whose files no longer match its manifest, set aside
                                   when a resume continued from an older one (kept for inspection; remove it by hand)
    <run_dir>/checkpoints/step_00000040.rolled_back/   written after a collapse that a rollback undid
    <run_dir>/final_hf/            HF export of the final policy
    <run_dir>/report.png           curves of the run
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from harmony_mcore.mcore.checkpoint import META_FILE, verify

_STEP_DIR = re.compile(r"^step_(\d{8})$")


@dataclass(frozen=True)
class Intact:
    """The outcome of looking for the newest intact checkpoint. checkpoint: (step, path), None when no complete
    checkpoint is intact; damaged: newer complete checkpoints passed over, each with what is wrong with it;
    verified: False when the chosen one has no manifest (written before manifests existed)."""

    checkpoint: tuple[int, Path] | None
    damaged: dict[Path, tuple[str, ...]] = field(default_factory=dict)
    verified: bool = True


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def create(cls, path: str | Path) -> RunDir:
        run = cls(Path(path))
        (run.root / "checkpoints").mkdir(parents=True, exist_ok=True)
        return run

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    @property
    def final_hf(self) -> Path:
        return self.root / "final_hf"

    @property
    def report(self) -> Path:
        return self.root / "report.png"

    @property
    def rollouts(self) -> Path:
        return self.root / "rollouts.jsonl"

    def checkpoint(self, step: int) -> Path:
        return self.root / "checkpoints" / f"step_{step:08d}"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints (renamed into place, metadata present), oldest first."""
        found = []
        for p in (self.root / "checkpoints").iterdir() if (self.root / "checkpoints").is_dir() else []:
            m = _STEP_DIR.match(p.name)
            if m and (p / META_FILE).is_file() and (p / "dist").is_dir():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest_checkpoint(self, at_most: int | None = None) -> tuple[int, Path] | None:
        """The newest complete checkpoint (structure only; `newest_intact` also checks its files)."""
        usable = self._up_to(at_most)
        return usable[-1] if usable else None

    def newest_intact(self, at_most: int | None = None) -> Intact:
        """The newest complete checkpoint (of at most `at_most` steps) whose files match its manifest
        (harmony_mcore.mcore.checkpoint.verify), checked newest first; the damaged ones passed over on the way.
        A checkpoint without a manifest counts as intact when its harmony.json reads (verified=False)."""
        damaged: dict[Path, tuple[str, ...]] = {}
        for step, path in reversed(self._up_to(at_most)):
            found = verify(path)
            if found.intact:
                return Intact((step, path), damaged, found.verified)
            damaged[path] = found.problems
        return Intact(None, damaged)

    def _up_to(self, at_most: int | None) -> list[tuple[int, Path]]:
        return [c for c in self.checkpoints() if at_most is None or c[0] <= at_most]

    def set_aside(self, path: Path, why: str) -> Path:
        """Rename a checkpoint out of the way (`step_N.<why>`, numbered when taken): never picked up again, and its
        step can be written anew; kept for inspection."""
        target = path.with_name(f"{path.name}.{why}")
        n = 1
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}.{why}.{n}")
        path.rename(target)
        return target

    def prune(self, keep_last: int) -> None:
        for _, path in self.checkpoints()[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)
