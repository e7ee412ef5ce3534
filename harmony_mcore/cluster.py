"""Ray actors of one run: TP x PP x DP Megatron policy ranks and the vLLM rollout engines.

GPU, colocated: one placement group of world one-GPU bundles; policy rank r sits on GPU r, and engine i's workers
on the engine_tp GPUs of bundles i*engine_tp ... (each actor asks Ray for a share of one GPU; an engine spanning
several GPUs is told their ids, which Ray cannot express); engines sleep while Megatron trains. GPU,
disaggregated: each engine gets a bundle of engine_tp GPUs of its own, which Ray assigns to it. CPU: every actor
asks for one logical CPU; a local cluster is started with enough logical CPUs for all of them (Ray counts physical
cores, and 4 ranks + an engine exceed 2 cores; they take turns in practice: generation and training alternate).
See `engine_placements` for the layout, `Cluster.sync_weights` for the memory hand-over around a sync.

Faults: every call of a weight sync is bounded (SYNC_TIMEOUT_S), and a sync that an engine's death or hang
interrupts leaves the survivors ready for another (`Cluster.sync_weights`; the trainer restarts the engine and
syncs again, harmony_mcore.train.Sampler.sync). Stopping: `Cluster.shutdown` after a start, `stop_ray` when a
start-up was interrupted before a Cluster existed; both leave no actor, engine process or /dev/shm file behind on
this machine. `start_ray` keeps the caller's signal handlers (Ray replaces SIGTERM's while it starts).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from harmony_mcore import console, sync
from harmony_mcore.config import Config
from harmony_mcore.mcore.policy import Policy
from harmony_mcore.rollout.engine import EngineSettings, RolloutEngine
from harmony_mcore.runtime import Runtime, decide
from harmony_mcore.sync.nccl import nccl_world_size
from harmony_mcore.sync.protocol import sweep_stale_shm
from harmony_mcore.weights.arch import ArchSpec

COLOCATED_SHARE = 0.45  # GPU fraction each colocated actor asks for (policy + engine share one GPU)
SYNC_TIMEOUT_S = 600.0  # one whole weight sync (an 8B model takes seconds over NCCL, well under a minute over shm)
SETTLE_TIMEOUT_S = 60.0  # after a failed sync: for the ranks' pushes to return, the survivors to close the update
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class WeightSyncFailed(RuntimeError):
    """A weight sync that did not finish. dead: the engines that died or hung (already killed, to be restarted).
    recoverable: every policy rank returned and every surviving engine closed its update, so the sync can be
    repeated once the dead engines are replaced; False when a rank is stuck inside the transfer (NCCL: a
    broadcast to a dead engine never returns), which only a new run clears."""

    def __init__(self, message: str, dead: list[int] | None = None, recoverable: bool = True):
        super().__init__(message)
        self.dead = dead or []
        self.recoverable = recoverable


@dataclass
class Cluster:
    policies: list  # actor handles, by global rank
    engines: list
    dp_rank_of: list[int]  # data-parallel rank of each policy rank
    placement: object | None = None
    engine_settings: EngineSettings | None = None
    _weights_connected: bool = field(default=False)
    shm: ShmLedger = field(default_factory=lambda: ShmLedger())  # /dev/shm files of the run's processes

    def on_all(self, method: str, *args, **kwargs) -> list:
        """Call a method on every policy rank; returns the results by rank."""
        return ray.get([getattr(p, method).remote(*args, **kwargs) for p in self.policies])

    def on_dp(self, method: str, shards: list, *args) -> list:
        """Call a method on every policy rank with its data-parallel rank's shard as first argument."""
        refs = [ray.put(shard) for shard in shards]  # one copy per DP shard, shared by its TP/PP ranks
        return ray.get([getattr(p, method).remote(refs[d], *args) for p, d in zip(self.policies, self.dp_rank_of)])

    def first_per_dp(self, per_rank: list) -> list:
        """One result per data-parallel rank (its TP/PP replicas return the same)."""
        first: dict[int, object] = {}
        for d, result in zip(self.dp_rank_of, per_rank):
            first.setdefault(d, result)
        return [first[d] for d in sorted(first)]

    def connect_weights(self) -> None:
        """(Re)build the weight transport between the policy ranks and the engines: at launch, and after an
        engine restart (NCCL groups cannot take a new member). NCCL: each pipeline stage's sender publishes a
        rendezvous, then the senders and every engine worker join the stage groups concurrently. CUDA IPC:
        the engines put vLLM's ipc backend in packed mode. shm: nothing to join (the ranks build senders)."""
        kind, tp = self.engine_settings.runtime.transport, self.engine_settings.tensor_parallel_size
        if self._weights_connected:
            ray.get([e.disconnect_weights.remote() for e in self.engines]
                    + [p.disconnect_weights.remote() for p in self.policies])
        endpoints = [ep for ep in self.on_all("weight_endpoint", kind) if ep]
        infos = sync.engine_init_infos(kind, endpoints=endpoints, num_engines=len(self.engines), engine_tp=tp)
        world = nccl_world_size(len(self.engines), tp)
        ray.get([e.connect_weights.remote(info) for e, info in zip(self.engines, infos)]
                + [p.connect_weights.remote(kind, world) for p in self.policies])
        self._weights_connected = True

    def sync_weights(self, version: int, bucket_mb: int, timeout_s: float = SYNC_TIMEOUT_S) -> dict[str, float]:
        """Push the policy's current weights into every engine; they then serve `version`.

        Colocated GPU engines come back from their level-2 sleep (`sleep_engines`) in two halves around the push:
        Megatron first returns its cached blocks to the driver, the engines re-allocate their weights, the push
        fills them, the ranks free their last transport buffer (CUDA IPC), and only then do the engines
        re-allocate their KV cache. Each call is a no-op where nothing sleeps (CPU, disaggregated).

        The whole sync has timeout_s. An engine that dies or hangs during it makes it raise WeightSyncFailed
        instead of blocking (`_recover_from`): the dead or hung engines are killed, which returns the ranks'
        pushes (a failed sender finishes its stage's TP gathers first, Policy.push_weights_or_drain), the
        survivors close their open update, and the error names the engines to restart before the sync is
        repeated (harmony_mcore.train.Sampler.sync)."""
        deadline = time.monotonic() + timeout_s
        pushes: list = []
        try:
            _get([p.release_memory.remote() for p in self.policies], deadline, "release_memory")
            _get([e.wake_weights.remote() for e in self.engines], deadline, "wake_weights")
            _get([e.begin_weight_update.remote(version) for e in self.engines], deadline, "begin_weight_update")
            pushes = [p.push_weights_or_drain.remote(self.engines, bucket_mb) for p in self.policies]
            stats = [s for s in _get(pushes, deadline, "push_weights") if s]
            _get([e.finish_weight_update.remote() for e in self.engines], deadline, "finish_weight_update")
            _get([p.release_memory.remote() for p in self.policies], deadline, "release_memory")
            _get([e.wake_up.remote() for e in self.engines], deadline, "wake_up")
        except WeightSyncFailed as failure:
            raise self._recover_from(failure, version, pushes) from failure
        self.shm.note()  # the slots and queues that now exist, for the clean-up after a kill
        return {"sync_bytes": sum(s["sync_bytes"] for s in stats), "sync_s": max(s["sync_s"] for s in stats)}

    def _recover_from(self, failure: WeightSyncFailed, version: int, pushes: list) -> WeightSyncFailed:
        """After a failed sync: kill the engines that are dead or hung (a sender waiting on one returns), give
        the ranks' pushes SETTLE_TIMEOUT_S to return, and have every surviving engine close its open update
        (finish_weight_update refuses the incomplete update and leaves the engine ready for the next one)."""
        dead = self.dead_engines()
        self.shm.note()
        for i in dead:
            try:
                ray.kill(self.engines[i])
            except Exception:  # noqa: BLE001 - already gone
                pass
        stuck = []
        if pushes:
            _, pending = ray.wait(pushes, num_returns=len(pushes), timeout=SETTLE_TIMEOUT_S)
            stuck = [rank for rank, ref in enumerate(pushes) if ref in set(pending)]
        where = f"weight sync of version {version} failed ({failure}); engines lost: {dead or 'none'}"
        if stuck:
            return WeightSyncFailed(f"{where}; policy ranks {stuck} are stuck in the "
                                    f"{self.engine_settings.runtime.transport} transfer, so the run cannot continue: "
                                    "resume it from its last checkpoint", dead, recoverable=False)
        alive = [e for i, e in enumerate(self.engines) if i not in dead]
        closing = [e.finish_weight_update.remote() for e in alive]
        if closing:
            ray.wait(closing, num_returns=len(closing), timeout=SETTLE_TIMEOUT_S)
        return WeightSyncFailed(where, dead)

    def dead_engines(self, timeout_s: float = 30.0) -> list[int]:
        """Engines that are gone, or that do not answer a ping within timeout_s (hung: they are replaced too)."""
        dead = []
        for i, engine in enumerate(self.engines):
            try:
                ray.get(engine.ping.remote(), timeout=timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                dead.append(i)
        return dead

    def sleep_engines(self) -> None:
        """Colocated GPU engines free all their GPU memory while Megatron trains (the next `sync_weights` wakes
        them; a no-op on CPU and for disaggregated engines). An engine that died meanwhile is left for that sync,
        which replaces it."""
        for ref in [e.sleep.remote() for e in self.engines]:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                pass

    def shutdown(self, grace_s: float = 30.0) -> None:
        """Close the policy ranks (weight senders release their /dev/shm slots, process groups are destroyed)
        and the engines (their EngineCore processes, their workers' parameter files), all at once, then kill
        every actor (vLLM's processes end with their actor's). Best effort: an actor that is already dead, busy
        or does not answer within grace_s is killed anyway, and /dev/shm files whose process is gone are
        removed."""
        self.shm.note()
        closing = [p.close.remote() for p in self.policies] + [e.shutdown.remote() for e in self.engines]
        ray.wait(closing, num_returns=len(closing), timeout=grace_s)
        for actor in self.policies + self.engines:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if self.placement is not None:
            try:
                remove_placement_group(self.placement)
            except Exception:  # noqa: BLE001 - Ray is going away
                pass
        self.shm.release(wait_s=10.0)


def _get(refs: list, deadline: float, what: str) -> list:
    """ray.get of every ref, waiting for all of them (so that a failure leaves no call running) until deadline;
    WeightSyncFailed naming the call when one fails or time runs out."""
    _ready, pending = ray.wait(refs, num_returns=len(refs), timeout=max(0.0, deadline - time.monotonic()))
    if pending:
        raise WeightSyncFailed(f"{what}: {len(pending)} of {len(refs)} calls did not return in time (an engine "
                               "or rank hung)")
    try:
        return ray.get(refs)
    except ray.exceptions.RayError as e:
        cause = getattr(e, "cause", None) or e  # a task's own exception, else Ray's (the actor died, ...)
        first = (str(cause).strip().splitlines() or [""])[0]
        raise WeightSyncFailed(f"{what}: {type(cause).__name__}: {first}") from e


class ShmLedger:
    """The /dev/shm files that the run's processes on this machine have mapped: our weight-sync slots and
    parameter arenas (harmony-*, harmony_mcore.sync) and vLLM's message queues (psm_*, Python's
    multiprocessing.shared_memory). A process that is killed (an engine that dies, an actor killed at shutdown)
    cannot unlink its files, so they are noted while the processes run and `release` removes those whose
    processes have all exited. Reads /proc/<pid>/maps of this process's descendants (the local Ray's workers and
    their children): other nodes and other machines' files are out of its reach."""

    PREFIXES = ("harmony-", "psm_")

    def __init__(self):
        self.files: dict[str, set] = {}  # path -> the processes (psutil.Process) that mapped it

    def note(self) -> None:
        import psutil

        try:
            procs = psutil.Process().children(recursive=True)
        except psutil.Error:
            return
        for proc in procs:
            try:
                with open(f"/proc/{proc.pid}/maps") as maps:
                    paths = {line.split(maxsplit=5)[-1].strip() for line in maps if " /dev/shm/" in line}
            except (OSError, IndexError):
                continue
            for path in paths:
                if Path(path).name.startswith(self.PREFIXES) and not path.endswith("(deleted)"):
                    self.files.setdefault(path, set()).add(proc)

    def release(self, wait_s: float = 0.0) -> None:
        """Unlink each noted file whose processes have all exited (after waiting up to wait_s for every noted
        process to exit: when all of them are being stopped), and our arenas and slots whose owner process is
        gone (named harmony-<tag>-<pid>-...)."""
        import psutil

        procs = list({proc for mappers in self.files.values() for proc in mappers})
        if wait_s > 0 and procs:
            psutil.wait_procs(procs, timeout=wait_s)
        for path, mappers in list(self.files.items()):
            if not any(_running(proc) for proc in mappers):
                Path(path).unlink(missing_ok=True)
                del self.files[path]
        sweep_stale_shm()


def _running(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def start_ray(cfg: Config) -> None:
    """Join the configured Ray cluster, or start a local one. The caller's handlers of SIGINT, SIGTERM and
    SIGUSR1 stay in force: Ray replaces SIGTERM's while it starts (its own exits the process), so they are put
    back afterwards, and a SIGTERM that Ray's handler caught during the start is stopped here (the partial start
    shut down) and raised again for the caller's handler."""
    if ray.is_initialized():
        return
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        _init_ray(cfg)
    except SystemExit:  # Ray's SIGTERM handler ran inside ray.init
        stop_ray()
        _restore(handlers)
        signal.raise_signal(signal.SIGTERM)
        raise
    finally:
        _restore(handlers)


def _restore(handlers: dict) -> None:
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def stop_ray() -> None:
    """After a start-up that was interrupted or failed before a Cluster existed: disconnect from Ray. A local
    cluster's processes stop with it (its actors and their engine processes too); on a shared cluster, the
    actors this driver created die with their owner. Then the /dev/shm files of processes that are gone."""
    ledger = ShmLedger()
    ledger.note()
    try:
        ray.shutdown()
    except Exception:  # noqa: BLE001 - a half-started Ray
        pass
    ledger.release(wait_s=10.0)


def _init_ray(cfg: Config) -> None:
    forward = cfg.logging.console == "all"  # else the actors write to <run_dir>/logs (harmony_mcore.console)
    if not forward:
        console.quiet_driver(cfg.logging.run_dir)
    quiet = {} if forward else {"logging_level": logging.WARNING}
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, log_to_driver=forward, **quiet)
        return
    world = cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.dp
    needed = world + cfg.rollout.engines
    # address="local": always a fresh cluster of our own, never one left running by another process.
    ray.init(address="local", num_cpus=max(cfg.ray.num_cpus or 0, needed), include_dashboard=False,
             log_to_driver=forward, **quiet,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": _pythonpath()}})


def _pythonpath() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)


@ray.remote(num_cpus=0)
def _free_address() -> tuple[str, int]:
    """IP and a free port on the node that will host policy rank 0 (the torch.distributed rendezvous)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return ray.util.get_node_ip_address(), s.getsockname()[1]


@dataclass(frozen=True)
class EnginePlacement:
    """Where engine i runs: its actor in placement-group bundle `bundle`, asking Ray for `num_gpus`; its
    workers on the GPUs of `gpu_bundles` (set explicitly when Ray's assignment to the actor does not cover them)."""

    bundle: int
    num_gpus: float
    gpu_bundles: tuple[int, ...]
    explicit_devices: bool


def placement_bundles(world: int, engines: int, engine_tp: int, runtime: Runtime) -> list[dict]:
    """The placement group: one bundle per policy rank, then one per disaggregated engine (engine_tp GPUs, on one
    node, as vLLM's tensor parallelism needs) or, on CPU, one CPU per engine."""
    if not runtime.on_gpu:
        return [{"CPU": 1} for _ in range(world + engines)]
    ranks = [{"GPU": 1, "CPU": 1} for _ in range(world)]
    return ranks if runtime.colocated else ranks + [{"GPU": engine_tp, "CPU": 1} for _ in range(engines)]


def engine_placements(world: int, engines: int, engine_tp: int, runtime: Runtime) -> list[EnginePlacement]:
    """Engine i, colocated: bundles i*engine_tp .. i*engine_tp + engine_tp - 1 (mod world; the planner and config
    keep engines * engine_tp <= world), its actor asking for a COLOCATED_SHARE of the first; with engine_tp > 1
    the other GPUs are named explicitly. Disaggregated: its own bundle world + i, all of whose engine_tp GPUs Ray
    assigns to the actor. CPU: its own one-CPU bundle world + i."""
    out = []
    for i in range(engines):
        if not runtime.on_gpu:
            out.append(EnginePlacement(world + i, 0.0, (), False))
        elif runtime.colocated:
            gpus = tuple((i * engine_tp + k) % world for k in range(engine_tp))
            out.append(EnginePlacement(gpus[0], COLOCATED_SHARE, gpus, engine_tp > 1))
        else:
            out.append(EnginePlacement(world + i, float(engine_tp), (world + i,), False))
    return out


def visible_devices(place: EnginePlacement, bundle_gpus: dict[int, tuple[str, str]]) -> str | None:
    """CUDA_VISIBLE_DEVICES of an engine whose GPUs are named explicitly, from each bundle's (node, GPU id);
    None when Ray's assignment suffices. An engine's GPUs must share a node (vLLM's workers are local)."""
    if not place.explicit_devices:
        return None
    nodes = {bundle_gpus[b][0] for b in place.gpu_bundles}
    if len(nodes) > 1:
        raise RuntimeError(f"engine bundles {place.gpu_bundles} span nodes {sorted(nodes)}: make engine_tp divide "
                           "the GPUs per node")
    return ",".join(bundle_gpus[b][1] for b in place.gpu_bundles)


@ray.remote(num_cpus=0, num_gpus=0.01)
def _bundle_gpu() -> tuple[str, str]:
    """(node, GPU id) of the bundle this probe runs in (a sliver of its GPU, beside the rank's share)."""
    return ray.util.get_node_ip_address(), str(ray.get_gpu_ids()[0])


def engine_settings(cfg: Config, hf_dir: str, runtime: Runtime) -> EngineSettings:
    r = cfg.rollout
    return EngineSettings(
        hf_dir=hf_dir, dtype=cfg.model.dtype, load_format="dummy",
        max_model_len=r.max_prompt_tokens + max(r.max_response_tokens, cfg.eval.max_response_tokens),
        tensor_parallel_size=r.engine_tp, gpu_memory_utilization=r.gpu_memory_utilization,
        enforce_eager=r.enforce_eager, seed=r.seed, runtime=runtime, cpu_weight_layout=r.cpu_weight_layout,
    )


def launch(cfg: Config, arch: ArchSpec, total_steps: int, engine_hf_dir: str) -> Cluster:
    """Decide the runtime from the GPUs Ray reports (harmony_mcore.runtime), then create and initialise every
    actor with it (policy ranks in parallel, then the engines)."""
    p, r = cfg.parallel, cfg.rollout
    world = p.tp * p.pp * p.dp
    runtime = decide(cfg, gpus=int(ray.cluster_resources().get("GPU", 0)))
    pg = placement_group(placement_bundles(world, r.engines, r.engine_tp, runtime), strategy="PACK")
    ray.get(pg.ready())
    addr, port = ray.get(_free_address.options(scheduling_strategy=_in_bundle(pg, 0)).remote())
    actor = ray.remote(Policy)
    share = (COLOCATED_SHARE if runtime.colocated else 1.0) if runtime.on_gpu else 0
    policies = [
        actor.options(num_cpus=1, num_gpus=share, scheduling_strategy=_in_bundle(pg, rank)).remote(
            cfg, arch, total_steps, rank=rank, world=world, master_addr=addr, master_port=port, local_rank=0,
            runtime=runtime, log_file=_log_file(cfg, f"policy-{rank}"))
        for rank in range(world)
    ]
    ranks = ray.get([pol.ping.remote() for pol in policies])
    cluster = Cluster(policies, [], [rk["dp_rank"] for rk in ranks], pg,
                      engine_settings(cfg, engine_hf_dir, runtime))
    cluster.engines = [_start_engine(cluster, cfg, i) for i in range(r.engines)]
    ray.get([e.ping.remote() for e in cluster.engines])
    cluster.connect_weights()
    return cluster


def _in_bundle(pg, index: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index)


def _start_engine(cluster: Cluster, cfg: Config, index: int):
    r, world, runtime = cfg.rollout, len(cluster.policies), cluster.engine_settings.runtime
    place = engine_placements(world, r.engines, r.engine_tp, runtime)[index]
    devices = None
    if place.explicit_devices:
        probes = ray.get([_bundle_gpu.options(scheduling_strategy=_in_bundle(cluster.placement, b)).remote()
                          for b in place.gpu_bundles])
        devices = visible_devices(place, dict(zip(place.gpu_bundles, probes)))
    # engine_tp > 1 spawns its own worker processes on the bundle's node (vLLM's mp executor).
    return ray.remote(RolloutEngine).options(num_cpus=0 if runtime.on_gpu else 1, num_gpus=place.num_gpus,
                                             scheduling_strategy=_in_bundle(cluster.placement, place.bundle),
                                             max_concurrency=1).remote(cluster.engine_settings, devices,
                                                                       _log_file(cfg, f"engine-{index}"))


def _log_file(cfg: Config, actor: str) -> str | None:
    return None if cfg.logging.console == "all" else console.actor_log(cfg.logging.run_dir, actor)


def restart_engine(cluster: Cluster, cfg: Config, index: int):
    """Replace a dead engine (the caller then pushes the current weights into it)."""
    try:
        ray.kill(cluster.engines[index])
    except Exception:  # noqa: BLE001 - it is dead already
        pass
    engine = _start_engine(cluster, cfg, index)
    ray.get(engine.ping.remote())
    cluster.engines[index] = engine
    cluster.connect_weights()  # the new engine joins (NCCL: every group is rebuilt)
    cluster.shm.release()  # what the old engine's processes left in /dev/shm (they are gone by now)
    return engine
