"""launch/slurm.sbatch on a real SLURM cluster: Debian's slurm-wlm + munge as one node on 127.0.0.1
(tests/slurm_cluster.py installs them when missing and runs every daemon from a temp dir).

One 8-step tiny CPU job gets SIGUSR1 mid-run (what `#SBATCH --signal=B:USR1@...` delivers before the time
limit): the trainer checkpoints and exits 75, the job requeues itself under the same id, and the requeued attempt
resumes from that checkpoint (metrics continue at the next step instead of starting again at 1) and completes:
Ray saw the node in each attempt, metrics, checkpoints, TensorBoard, report and HF export are in the per-job run
dir. Each attempt starts Ray and a vLLM engine (about a minute on 2 cores); the module takes about 3 minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import FINISHED, SlurmCluster, SlurmUnavailable

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.stack]

ROOT = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 600  # per phase; generous for a loaded machine


@pytest.fixture(scope="module")
def slurm():
    if not sys.platform.startswith("linux"):
        pytest.skip("the SLURM test cluster needs Linux")
    state = Path(tempfile.mkdtemp(prefix="hm-slurm-"))  # short: munge's socket path must fit AF_UNIX
    try:
        cluster = SlurmCluster.start(state)
    except SlurmUnavailable as e:
        shutil.rmtree(state, ignore_errors=True)
        pytest.skip(f"no local SLURM cluster: {e}")
    yield cluster
    cluster.stop()  # cancels our unfinished jobs first, then every daemon by its pid file
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny Qwen3 HF model and a 16-question task (4 questions per step: 4 steps per epoch)."""
    from harmony_mcore.data.synthetic import make_task, write_task
    from harmony_mcore.tiny import make_tiny_hf_model

    root = tmp_path_factory.mktemp("slurm_ws")
    model = make_tiny_hf_model(root / "model", "qwen3")
    _, test = write_task(make_task(0, 8, 16), root / "task")
    (root / "runs").mkdir()
    return {"root": root, "model": Path(model), "data": Path(test), "runs": root / "runs"}


def submit(cluster: SlurmCluster, ws: dict, name: str, *overrides: str) -> str:
    """sbatch launch/slurm.sbatch configs/cpu_tiny.yaml from the repository root; returns the job id."""
    env = dict(cluster.env)
    env.pop("RAY_ADDRESS", None)
    if sys.prefix != sys.base_prefix:
        env["HARMONY_VENV"] = sys.prefix  # the venv running the tests runs the job
    else:
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["HARMONY_RAY_CPUS"] = "4"  # TP=2 ranks + 1 engine need 3 Ray CPUs; the node has fewer cores
    env["HARMONY_RUN_ROOT"] = str(ws["runs"])
    args = [f"--job-name={name}", f"--output={ws['runs']}/slurm-%j.out", "launch/slurm.sbatch",
            "configs/cpu_tiny.yaml", f"model.hf_path={ws['model']}", f"train.data={ws['data']}",
            "logging.progress=false", *overrides]
    return cluster.sbatch(args, cwd=ROOT, env=env)


def job_logs(cluster: SlurmCluster, ws: dict, job_id: str) -> str:
    """What to show when an assertion fails: the job's SLURM output, launcher log and the daemons' logs."""
    parts = []
    for path in (ws["runs"] / f"slurm-{job_id}.out", ws["runs"] / job_id / "logs" / "launcher.log"):
        text = path.read_text(errors="replace") if path.exists() else "(none)"
        parts.append(f"--- {path}:\n{text[-6000:]}")
    return "\n".join(parts) + "\n" + cluster.logs()


def metric_steps(run_dir: Path) -> list[int]:
    if not (run_dir / "metrics.jsonl").exists():
        return []
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def checkpoint_steps(run_dir: Path) -> list[int]:
    from harmony_mcore.run_dir import RunDir

    return [step for step, _ in RunDir(run_dir).checkpoints()]


def test_usr1_checkpoints_requeues_and_resumes_and_completes(slurm, workspace):
    """One job for the whole life of a SLURM run (the suite's time budget): Ray started by the launcher on the
    allocation, steps, SIGUSR1 mid-run -> checkpoint, exit 75, requeue, resume at the next step, completion with
    metrics, TensorBoard, report and the exported HF model."""
    total = 8
    t0 = time.monotonic()
    job_id = submit(slurm, workspace, "hm-requeue", f"train.max_steps={total}", "train.epochs=2",
                    "checkpoint.every=1000")  # the only checkpoints: the one the signal asks for, and the last
    run = workspace["runs"] / job_id

    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not metric_steps(run):  # mid-run: at least one step done
        info = slurm.job(job_id)
        assert info.get("JobState") in ("PENDING", "RUNNING"), f"{info}\n{job_logs(slurm, workspace, job_id)}"
        assert time.monotonic() < deadline, f"no step after {JOB_TIMEOUT_S}s\n{job_logs(slurm, workspace, job_id)}"
        time.sleep(1)
    t_signal, at_signal = time.monotonic(), metric_steps(run)
    slurm.run(["scancel", "--batch", "--signal=USR1", job_id])

    # The job requeues itself: same id, Restarts=1. SLURM keeps a requeued batch job ineligible for about two
    # minutes (Reason=BeginTime); an administrator's `StartTime=now` shortens that wait, nothing else.
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        info = slurm.job(job_id)
        if info.get("Restarts") == "1" and info.get("JobState") in ("PENDING", "RUNNING"):
            break
        assert info.get("JobState") not in FINISHED, f"not requeued: {info}\n{job_logs(slurm, workspace, job_id)}"
        assert time.monotonic() < deadline, f"not requeued: {info}\n{job_logs(slurm, workspace, job_id)}"
        time.sleep(1)
    t_requeued = time.monotonic()
    first_attempt = metric_steps(run)
    checkpointed = checkpoint_steps(run)
    if info["JobState"] == "PENDING" and info.get("Reason") == "BeginTime":
        # Not at once: slurmd (22.05) rejects a batch launch that arrives while it is still tearing down the
        # killed attempt of the same job id ("Job N already killed, do not launch batch job") and the job then
        # ends FAILED. SLURM's own BeginTime delay exists to avoid exactly that; 10 s is ample on one node.
        time.sleep(10)
        slurm.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])

    info = slurm.wait_job(job_id, FINISHED, JOB_TIMEOUT_S)
    logs = job_logs(slurm, workspace, job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", \
        f"{info}\n{logs}"

    stop = first_attempt[-1]
    print(f"\njob {job_id}: USR1 after step {at_signal[-1]} ({t_signal - t0:.0f}s), attempt 0 stopped at step "
          f"{stop} with checkpoint {checkpointed}, requeued {t_requeued - t_signal:.0f}s after the signal, "
          f"attempt 1 ran steps {metric_steps(run)[len(first_attempt):]}; total {time.monotonic() - t0:.0f}s")
    # attempt 0: steps 1..K, then the checkpoint of step K, written because of the signal
    assert first_attempt == list(range(1, stop + 1)) and stop < total, logs
    assert checkpointed == [stop], logs
    # attempt 1 resumed from step K: it continues at K+1 (a fresh start would log step 1 again)
    assert metric_steps(run) == list(range(1, total + 1)), logs
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    assert rows[stop]["weight_version"] == stop + 1, rows[stop]
    assert checkpoint_steps(run) == [stop, total], logs

    for attempt in (0, 1):  # each attempt started Ray on the allocation and logged on its own
        nodes = json.loads((run / "logs" / f"ray_nodes.r{attempt}.json").read_text())
        assert [n["NodeManagerHostname"].split(".")[0] for n in nodes] == [slurm.node], logs
        assert nodes[0]["Resources"]["CPU"] == 4, nodes[0]["Resources"]
        assert (run / "logs" / f"train.r{attempt}.log").stat().st_size > 0
        assert (run / "logs" / f"ray.{slurm.node}.r{attempt}.log").exists(), sorted((run / "logs").iterdir())
    assert (run / "logs" / "launcher.log").read_text().count("ray: 1/1 nodes alive") >= 2, logs
    assert list((run / "tb").glob("events.out.tfevents.*")), logs
    assert (run / "report.png").stat().st_size > 0
    assert (run / "final_hf" / "config.json").exists()

    launcher = (run / "logs" / "launcher.log").read_text()
    assert "got SIGUSR1" in launcher and "trainer exited with 75" in launcher, logs
    assert f"requeueing job {job_id}" in launcher, logs
    assert f"job {job_id} attempt 1" in launcher and "--resume" in launcher, logs
    assert (run / "logs" / "train.r0.log").exists() and (run / "logs" / "train.r1.log").exists()
    assert (run / "final_hf" / "config.json").exists()
