"""Checkpoint discovery: only complete checkpoints are ever picked up."""

from __future__ import annotations

from harmony_mcore.mcore.checkpoint import META_FILE
from harmony_mcore.run_dir import RunDir


def _ckpt(run: RunDir, step: int, complete: bool = True, partial: bool = False):
    path = run.checkpoint(step)
    if partial:
        path = path.with_name(path.name + ".partial")
    (path / "dist").mkdir(parents=True)
    if complete:
        (path / META_FILE).write_text("{}")


def test_latest_ignores_partial_and_incomplete(tmp_path):
    run = RunDir.create(tmp_path)
    assert run.latest_checkpoint() is None
    _ckpt(run, 2)
    _ckpt(run, 4)
    _ckpt(run, 6, partial=True)  # interrupted mid-write
    _ckpt(run, 8, complete=False)  # no metadata: not renamed into place by us
    assert [s for s, _ in run.checkpoints()] == [2, 4]
    assert run.latest_checkpoint()[0] == 4
    assert run.latest_checkpoint(at_most=3)[0] == 2
    run.prune(keep_last=1)
    assert [s for s, _ in run.checkpoints()] == [4]


# --- intact checkpoints: the manifest written at save time, checked before a resume --------------------------


def _meta_json(step: int) -> str:
    from harmony_mcore.mcore.checkpoint import CheckpointMeta
    from harmony_mcore.weights.arch import ArchSpec

    arch = ArchSpec("qwen3", 2, 64, 128, 4, 2, 16, 1000, False, False, True, 1e-6, 1e6, None, 512)
    return CheckpointMeta(arch, 1024, "float32", {"step": step}).to_json()


def _saved(run: RunDir, step: int, manifest: bool = True):
    """A checkpoint as checkpoint.save leaves it: dist shards, metadata, harmony.json, hf/, then the manifest."""
    from harmony_mcore.mcore.checkpoint import write_manifest

    path = run.checkpoint(step)
    (path / "dist").mkdir(parents=True)
    (path / "hf").mkdir()
    for rank in range(2):
        (path / "dist" / f"__{rank}_0.distcp").write_bytes(bytes((step + rank + i) % 251 for i in range(40_000)))
    (path / "dist" / ".metadata").write_bytes(b"torch_dist metadata")
    (path / "hf" / "config.json").write_text('{"model_type": "qwen3"}')
    (path / META_FILE).write_text(_meta_json(step))
    if manifest:
        write_manifest(path)
    return path


def test_manifest_names_every_kind_of_damage(tmp_path):
    from harmony_mcore.mcore.checkpoint import MANIFEST_FILE, verify

    run = RunDir.create(tmp_path)
    path = _saved(run, 2)
    assert verify(path).intact and verify(path).verified
    manifest = (path / MANIFEST_FILE).read_text()
    assert '"dist/__1_0.distcp"' in manifest and '"hf/config.json"' in manifest and '"crc32"' in manifest

    shard = path / "dist" / "__0_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[:1000])  # truncated
    assert verify(path).problems == ("dist/__0_0.distcp: 1,000 bytes, the manifest says 40,000 (truncated or "
                                     "overwritten)",)
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit flipped, same size
    (problem,) = verify(path).problems
    assert problem.startswith("dist/__0_0.distcp: checksum ") and "content changed" in problem
    shard.unlink()
    assert verify(path).problems == ("dist/__0_0.distcp: missing",)
    shard.write_bytes(data)
    (path / META_FILE).write_text((path / META_FILE).read_text()[:-20])  # harmony.json cut short
    (problem,) = verify(path).problems  # named once, as unreadable (not a second time for its checksum)
    assert problem.startswith("harmony.json: damaged (JSONDecodeError")
    (path / META_FILE).write_text(_meta_json(2))
    (path / MANIFEST_FILE).write_text("{not json")
    (problem,) = verify(path).problems
    assert problem.startswith("manifest.json: damaged")


def test_newest_intact_skips_damaged_newer_checkpoints(tmp_path):
    run = RunDir.create(tmp_path)
    _saved(run, 2)
    four = _saved(run, 4)
    six = _saved(run, 6)
    with open(four / "dist" / "__1_0.distcp", "r+b") as f:
        f.truncate(123)
    (six / META_FILE).write_text("{ corrupt")
    found = run.newest_intact()
    assert found.checkpoint == (2, run.checkpoint(2)) and found.verified
    assert list(found.damaged) == [six, four]  # newest first, each with what is wrong with it
    assert found.damaged[four] == ("dist/__1_0.distcp: 123 bytes, the manifest says 40,000 (truncated or "
                                   "overwritten)",)
    assert found.damaged[six][0].startswith("harmony.json: damaged (JSONDecodeError")
    assert run.newest_intact(at_most=3).checkpoint[0] == 2 and not run.newest_intact(at_most=3).damaged
    assert run.latest_checkpoint()[0] == 6  # structure alone does not see the damage

    (run.checkpoint(2) / "dist" / "__0_0.distcp").write_bytes(b"")
    nothing = run.newest_intact()
    assert nothing.checkpoint is None and len(nothing.damaged) == 3


def test_checkpoint_without_manifest_is_accepted_unverified(tmp_path):
    run = RunDir.create(tmp_path)
    _saved(run, 2, manifest=False)
    found = run.newest_intact()
    assert found.checkpoint[0] == 2 and not found.verified and not found.damaged
    (run.checkpoint(2) / META_FILE).write_text("not json")  # what can still be checked, is
    assert run.newest_intact().checkpoint is None


def test_set_aside_frees_the_step_and_keeps_the_files(tmp_path):
    run = RunDir.create(tmp_path)
    first = run.set_aside(_saved(run, 4), "damaged")
    second = run.set_aside(_saved(run, 4), "damaged")
    assert (first.name, second.name) == ("step_00000004.damaged", "step_00000004.damaged.2")
    assert run.checkpoints() == [] and (second / META_FILE).is_file()


def test_rollback_skips_damaged_checkpoints_and_sets_later_ones_aside(tmp_path, capsys):
    """The collapse rollback picks checkpoints the way --resume does, and moves the newer ones out of the way so
    the replayed steps can write theirs (they failed with "output directory already exists" before)."""
    import pytest

    from harmony_mcore.train import MAX_ROLLBACKS, StopRun, rollback

    run = RunDir.create(tmp_path)
    for step in (2, 4, 6, 8):
        _saved(run, step)
    (run.checkpoint(6) / META_FILE).write_text("{")
    calls = []

    class Cluster:
        def on_all(self, method, *args):
            calls.append((method, *args))

    class Sampler:
        cluster = Cluster()

        def sync(self, version):
            calls.append(("sync", version))

    class Detector:
        def reset(self):
            calls.append(("reset",))

    state = {"rollbacks": 0}
    assert rollback(Sampler(), run, 7, Detector(), state) == 4  # collapse signals from step 8 on
    assert calls == [("load_checkpoint", str(run.checkpoint(4))), ("sync", 4), ("reset",)]
    assert state["rollbacks"] == 1 and [s for s, _ in run.checkpoints()] == [2, 4]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_00000002", "step_00000004", "step_00000006.damaged", "step_00000008.rolled_back"]
    assert "skipping damaged checkpoint" in capsys.readouterr().err
    state["rollbacks"] = MAX_ROLLBACKS
    with pytest.raises(StopRun, match="no good checkpoint"):
        rollback(Sampler(), run, 7, Detector(), state)
