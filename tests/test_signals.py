"""Stopping a run and surviving faults, for real, on the tiny CPU config (Megatron TP=2 on gloo, one vLLM-CPU
engine, Ray); harmony_mcore.train.Stop says what each signal does, docs/reliability.md lists the cases.

1. SIGINT during start-up, delivered the way a terminal's Ctrl-C is (to launch/local.sh's whole process group)
   while the engine starts: start-up stops at once, exit 75, no checkpoint.
2. SIGTERM straight to the trainer while a step is blocked on the engine (its EngineCore is stopped: the step is
   in generation, or in the weight sync that also needs the engine): the step finishes, a checkpoint, exit 75.
3. That run resumed past two damaged newer checkpoints (a truncated shard, a corrupt harmony.json): both named and
   set aside, the run continues from the intact one; then two SIGINTs mid-step: stopped at once, exit 130.
4. In process: a SIGTERM during a weight sync lets the sync finish; an engine SIGKILLed during a sync is restarted
   and synced again (log-prob parity with Megatron proves its weights); an engine that hangs during a sync makes
   it time out and is killed, a recoverable failure that names it (the restart that follows is the one above).
After each, no process the run started and no /dev/shm file they mapped may remain. SIGUSR1 (SLURM's warning before
the time limit) is tested through sbatch in tests/test_slurm.py. The first two tests below need no Ray (seconds);
the other three take about 7 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.stack, pytest.mark.slow]  # Ray and vLLM engines, minutes

psutil = pytest.importorskip("psutil")

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 600  # per phase, generous for a loaded machine


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    from harmony_mcore.data.synthetic import make_task, write_task

    return write_task(make_task(0, 8, 16), tmp_path_factory.mktemp("task"))[1]


@pytest.fixture
def runs():
    """The runs a test starts; whatever of theirs still runs when it ends (a failed assertion) is killed."""
    started: list[Run] = []
    yield started
    for run in started:
        if run.proc.poll() is None:
            run.tree.sample()
            for proc in [*run.tree.procs.values()]:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
            run.proc.wait(60)


def _overrides(hf: Path, data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"model.hf_path={hf}", f"train.data={data}", f"logging.run_dir={run_dir}", "eval.every=0",
            "checkpoint.every=1000", "checkpoint.export_hf=false", *extra]


class Run:
    """A trainer started in a session of its own, and everything it starts: a thread samples its process tree
    and the /dev/shm files those processes map until it exits."""

    def __init__(self, cmd: list[str], log: Path, env: dict | None = None):
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        self.tree = Tree(self.proc.pid)
        self.started = time.monotonic()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, what: str, ready, timeout: float = WAIT_S):
        """Poll ready() until it returns something truthy; fails (with the run's output) if the run exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = ready()
            if found:
                return found
            assert self.proc.poll() is None, f"exited with {self.proc.returncode} before {what}:\n{self.tail()}"
            time.sleep(0.2)
        raise AssertionError(f"no {what} after {timeout}s:\n{self.tail()}")

    def engine_core(self):
        return self.tree.engine_core()

    def exit_code(self, timeout: float = WAIT_S) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running {timeout}s after it was asked to stop:\n{self.tail()}") from None

    def tail(self) -> str:
        return "\n".join(line for line in self.output().splitlines() if " INFO " not in line)[-6000:]

    def assert_nothing_left(self) -> None:
        procs, files = self.tree.leftovers()
        assert not procs and not files, f"left behind: processes {procs}, /dev/shm files {files}\n{self.tail()}"


class Tree:
    """Processes descending from `root_pid` (or from this process, ignoring those that exist already) and the
    /dev/shm files they map or own (harmony-<tag>-<pid>-...), sampled every 0.3 s in a thread."""

    def __init__(self, root_pid: int | None = None):
        self.root = psutil.Process(root_pid)
        self.with_root = root_pid is not None
        self.ignore = set() if root_pid else {p.pid for p in self.root.children(recursive=True)}
        self.procs: dict[tuple[int, float], psutil.Process] = {}
        self.shm: set[str] = set()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._done.is_set():
            self.sample()
            time.sleep(0.3)

    def sample(self) -> None:
        try:
            procs = [self.root] * self.with_root + self.root.children(recursive=True)
        except psutil.Error:
            return
        for proc in procs:
            if proc.pid in self.ignore:
                continue
            try:
                self.procs.setdefault((proc.pid, proc.create_time()), proc)
                with open(f"/proc/{proc.pid}/maps") as maps:
                    self.shm |= {line.split(maxsplit=5)[-1].strip() for line in maps if " /dev/shm/" in line}
            except (psutil.Error, OSError, IndexError):
                continue
            self.shm |= {str(f) for f in Path("/dev/shm").glob(f"harmony-*-{proc.pid}-*")}

    def engine_core(self):
        return next((p for p in list(self.procs.values()) if _is_engine_core(p)), None)

    def leftovers(self, wait_s: float = 30.0) -> tuple[list[str], list[str]]:
        """What is still there wait_s after the run exited (Ray's own processes get that long to go)."""
        self.sample()
        self._done.set()
        self._thread.join()
        deadline = time.monotonic() + wait_s
        while True:
            procs = [f"{p.pid} {_name(p)}" for p in self.procs.values() if _running(p)]
            files = sorted(f for f in self.shm if not f.endswith("(deleted)") and os.path.exists(f))
            if (not procs and not files) or time.monotonic() > deadline:
                return procs, files
            time.sleep(0.5)


def _is_engine_core(proc) -> bool:
    """vLLM's EngineCore process (its title; the kernel's process name stops at 15 characters)."""
    try:
        return proc.is_running() and any("EngineCor" in part for part in (proc.name(), *proc.cmdline()[:1]))
    except psutil.Error:
        return False


def _name(proc) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return "?"


def _running(proc) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line] if path.exists() else []


def _checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir()) if (run_dir / "checkpoints").is_dir() else []


def _train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "harmony_mcore", "train", "--config", str(REPO / "configs" / "cpu_tiny.yaml"), *args]


def test_stop_answers_each_signal_by_phase(tmp_path, capfd):
    """harmony_mcore.train.Stop without a run: start-up abandons at once, training finishes the step, a second
    SIGINT abandons at once, and while cleaning up every signal is only acknowledged."""
    from harmony_mcore.run_dir import RunDir
    from harmony_mcore.train import EXIT_INTERRUPTED, EXIT_REQUEUE, Stop

    before = {sig: signal.getsignal(sig) for sig in Stop.SIGNALS}
    stop = Stop()
    try:
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGUSR1)  # during start-up
        assert stop.signal == "SIGUSR1" and not stop.at_once
        signal.raise_signal(signal.SIGINT)  # start-up is being abandoned already: acknowledged
        assert stop.interrupted(RunDir(tmp_path)) == EXIT_REQUEUE
    finally:
        stop.restore()
    stop = Stop()
    try:
        stop.training()
        signal.raise_signal(signal.SIGTERM)  # finish the step
        signal.raise_signal(signal.SIGTERM)  # again (SLURM signals the whole job step): still finish the step
        signal.raise_signal(signal.SIGUSR1)
        assert stop() and stop.signal == "SIGTERM" and not stop.at_once
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # a second Ctrl-C after any stop signal: at once
        assert stop.at_once
        stop.cleaning_up()
        signal.raise_signal(signal.SIGINT)
        assert stop.interrupted(RunDir(tmp_path)) == EXIT_INTERRUPTED
    finally:
        stop.restore()
    assert {sig: signal.getsignal(sig) for sig in Stop.SIGNALS} == before
    err = capfd.readouterr().err
    for line in ("SIGUSR1 during start-up: stopping now", "SIGTERM: finishing this step",
                 "SIGTERM: already stopping after this step", "SIGINT again: stopping at once",
                 "SIGINT: already stopping, cleaning up", "stopped by SIGUSR1 during start-up; no checkpoint exists yet",
                 "stopped at once (a second SIGINT)"):
        assert line in err, line


def test_start_ray_keeps_our_handlers_and_replays_a_sigterm_that_ray_caught(monkeypatch):
    """Ray installs its own SIGTERM handler while it starts (sys.exit): start_ray puts the caller's back, and a
    SIGTERM that Ray's caught inside ray.init is given to the caller's handler once the partial start is stopped."""
    from harmony_mcore import cluster

    calls = []

    def ray_init_hit_by_sigterm(cfg):
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # Ray's own
        signal.raise_signal(signal.SIGTERM)

    def ours(signum, frame):
        calls.append(signal.Signals(signum).name)
        raise KeyboardInterrupt

    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cluster, "stop_ray", lambda: calls.append("stop_ray"))
    monkeypatch.setattr(cluster, "_init_ray", ray_init_hit_by_sigterm)
    previous = signal.signal(signal.SIGTERM, ours)
    try:
        with pytest.raises(KeyboardInterrupt):
            cluster.start_ray(None)
        assert calls == ["stop_ray", "SIGTERM"] and signal.getsignal(signal.SIGTERM) is ours
        monkeypatch.setattr(cluster, "_init_ray", lambda cfg: signal.signal(signal.SIGTERM, signal.SIG_DFL))
        cluster.start_ray(None)  # a start that went through: Ray's handler is replaced by ours again
        assert signal.getsignal(signal.SIGTERM) is ours
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_ctrl_c_during_startup_stops_at_once_through_local_sh(tiny_qwen3, task_file, tmp_path, runs):
    run_dir = tmp_path / "run"
    env = dict(os.environ, HARMONY_VENV=sys.prefix)
    env.pop("RAY_ADDRESS", None)
    run = Run(["launch/local.sh", str(REPO / "configs" / "cpu_tiny.yaml"),
               *_overrides(tiny_qwen3, task_file, run_dir)], tmp_path / "out.log", env)
    runs.append(run)
    run.wait_for("a starting engine", run.engine_core)
    os.killpg(run.proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: local.sh's group (the trainer has its own)
    t0 = time.monotonic()
    assert run.exit_code() == 75, run.tail()
    stopped_in = time.monotonic() - t0
    out = run.output()
    assert "SIGINT during start-up: stopping now" in out and "stopped by SIGINT during start-up" in out, run.tail()
    assert out.count("[harmony-mcore] SIGINT") == 1  # the Ctrl-C reached the trainer once, through local.sh
    assert _checkpoints(run_dir) == [] and _steps(run_dir) == []
    run.assert_nothing_left()
    print(f"\nSIGINT {t0 - run.started:.0f}s into start-up: exit 75 {stopped_in:.1f}s later")


def test_sigterm_mid_step_checkpoints_then_a_resume_skips_damaged_checkpoints_and_two_sigints_stop_at_once(
        tiny_qwen3, task_file, tmp_path, runs):
    run_dir = tmp_path / "run"
    # --- SIGTERM while step 2 waits on the engine: step 2 finishes, is checkpointed, exit 75
    run = Run(_train_cmd(*_overrides(tiny_qwen3, task_file, run_dir, "train.max_steps=3")), tmp_path / "a.log")
    runs.append(run)
    run.wait_for("step 1", lambda: _steps(run_dir))
    core = run.engine_core()
    core.suspend()  # step 2 now blocks in its generation (or, were that done, in its weight sync)
    try:
        time.sleep(1.0)
        assert _steps(run_dir) == [1], "step 2 finished without the engine"
        run.proc.send_signal(signal.SIGTERM)
        run.wait_for("the handler's answer", lambda: "SIGTERM: finishing this step" in run.output())
    finally:
        core.resume()
    assert run.exit_code() == 75, run.tail()
    assert "stopped by SIGTERM after step 2" in run.output()
    assert _steps(run_dir) == [1, 2] and _checkpoints(run_dir) == ["step_00000002"]
    run.assert_nothing_left()

    # --- two damaged checkpoints newer than the intact one
    intact = run_dir / "checkpoints" / "step_00000002"
    truncated, corrupt = (shutil.copytree(intact, run_dir / "checkpoints" / f"step_0000000{s}") for s in (3, 4))
    shard = max((truncated / "dist").glob("*.distcp"), key=lambda p: p.stat().st_size)
    half = shard.stat().st_size // 2
    with open(shard, "r+b") as f:
        f.truncate(half)
    (corrupt / "harmony.json").write_text((corrupt / "harmony.json").read_text()[:40])

    # --- resumed: continues from step 2; then two SIGINTs while step 4 waits on the engine: exit 130 at once
    run = Run(_train_cmd("--resume", *_overrides(tiny_qwen3, task_file, run_dir, "train.max_steps=4")),
              tmp_path / "b.log")
    runs.append(run)
    run.wait_for("step 3", lambda: _steps(run_dir)[2:])
    core = run.engine_core()
    core.suspend()
    try:
        run.proc.send_signal(signal.SIGINT)
        run.wait_for("the handler's answer", lambda: "SIGINT: finishing this step" in run.output())
        run.proc.send_signal(signal.SIGINT)
        run.wait_for("the second answer", lambda: "SIGINT again: stopping at once" in run.output())
    finally:
        core.resume()
    assert run.exit_code() == 130, run.tail()
    out = run.output()
    assert f"skipping damaged checkpoint {corrupt}: harmony.json: damaged (JSONDecodeError" in out, run.tail()
    assert f"skipping damaged checkpoint {truncated}: dist/{shard.name}: {half:,} bytes, the manifest says" in out, \
        run.tail()
    assert "stopped at once (a second SIGINT)" in out
    assert _steps(run_dir) == [1, 2, 3]  # step 3 continued from step 2's checkpoint; step 4 was abandoned
    assert _checkpoints(run_dir) == ["step_00000002", "step_00000003.damaged", "step_00000004.damaged"]
    run.assert_nothing_left()


def test_sigterm_during_a_sync_and_an_engine_killed_during_a_sync(tiny_qwen3, tmp_path, capfd):
    import ray

    from harmony_mcore.cluster import WeightSyncFailed, launch, start_ray
    from harmony_mcore.config import load_config
    from harmony_mcore.data.synthetic import make_task
    from harmony_mcore.train import Sampler, Stop
    from harmony_mcore.weights.arch import ArchSpec

    tree = Tree()  # what this test starts: Ray, the actors, vLLM's processes
    cfg = load_config(str(REPO / "configs" / "cpu_tiny.yaml"),
                      [f"model.hf_path={tiny_qwen3}", f"logging.run_dir={tmp_path}", "rollout.sync_bucket_mb=1",
                       "rollout.max_response_tokens=16"])
    start_ray(cfg)
    try:
        cluster = launch(cfg, ArchSpec.from_hf_dir(tiny_qwen3), total_steps=4, engine_hf_dir=str(tiny_qwen3))
        sampler = Sampler(cfg, cluster)
        sampler.sync(0)
        version = ray.get(cluster.engines[0].__ray_call__.remote(lambda engine: engine.version))
        assert version == 0

        # SIGTERM while a sync waits on the engine: the handler only records it; the sync finishes
        stop = Stop()
        stop.training()
        core = _engine_core(cluster)
        core.suspend()
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
        threading.Timer(4.0, core.resume).start()
        t0 = time.monotonic()
        try:
            stats = sampler.sync(1)
        finally:
            stop.restore()
            core.resume()
        assert time.monotonic() - t0 > 3.5 and stats["sync_bytes"] > 0
        assert stop.signal == "SIGTERM" and "SIGTERM: finishing this step" in capfd.readouterr().err
        assert ray.get(cluster.engines[0].__ray_call__.remote(lambda engine: engine.version)) == 1

        # the engine SIGKILLed while the sync waits on it (its first bucket sent): restarted, synced again
        old = ray.get(cluster.engines[0].ping.remote())
        core = _engine_core(cluster)
        core.suspend()
        threading.Timer(1.5, _kill_tree, (old,)).start()
        stats = sampler.sync(2)
        err = capfd.readouterr().err
        assert "weight sync of version 2 failed (push_weights: " in err, err[-3000:]
        assert "restarting engine(s) [0] and syncing again" in err
        assert stats["sync_bytes"] > 0 and cluster.dead_engines() == []
        assert ray.get(cluster.engines[0].ping.remote()) != old
        assert ray.get(cluster.engines[0].__ray_call__.remote(lambda engine: engine.version)) == 2
        questions = list(make_task(0, 4, 8).test[:2])
        rollouts = sampler.rollout(questions, 2, 0)
        megatron = next(x for x in cluster.on_all("rollout_logprobs", rollouts) if x)
        assert max(abs(a - b) for r, mine in zip(rollouts, megatron) for a, b in zip(r.logprobs, mine)) <= 1e-3

        # the engine hangs during a sync (as one does when an NCCL peer dies): the sync times out and the hung
        # engine is killed, a recoverable failure naming it, which Sampler.sync answers with the restart and
        # resync shown above (not repeated: an engine start costs the suite a minute); sleep_engines tolerates it
        core = _engine_core(cluster)
        core.suspend()
        with pytest.raises(WeightSyncFailed, match=r"push_weights: [12] of 2 calls did not return in time") as failed:
            cluster.sync_weights(3, cfg.rollout.sync_bucket_mb, timeout_s=5.0)
        assert failed.value.dead == [0] and failed.value.recoverable
        assert cluster.dead_engines() == [0]
        cluster.sleep_engines()
        cluster.shutdown()
    finally:
        ray.shutdown()
    procs, files = tree.leftovers()
    assert not procs and not files, f"left behind: processes {procs}, /dev/shm files {files}"


def _engine_core(cluster):
    import ray

    actor = psutil.Process(ray.get(cluster.engines[0].ping.remote()))
    return next(p for p in actor.children(recursive=True) if _is_engine_core(p))


def _kill_tree(pid: int) -> None:
    """SIGKILL an engine actor's process and its vLLM processes (a stopped EngineCore included)."""
    procs = psutil.Process(pid).children(recursive=True) + [psutil.Process(pid)]
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
