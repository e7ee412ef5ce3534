"""Ray actors of one run: TP x PP x DP Megatron policy ranks and the vLLM rollout engines.

GPU, colocated: one placement group of world one-GPU bundles; policy rank r sits on GPU r, and engine i's workers
on the engine_tp GPUs of bundles i*engine_tp ... (each actor asks Ray for a share of one GPU; an engine spanning
several GPUs is told their ids, which Ray cannot express); engines sleep while Megatron trains. GPU,
disaggregated: each engine gets a bundle of engine_tp GPUs of its own, which Ray assigns to it. CPU: every actor
asks for one logical CPU; a local cluster is started with enough logical CPUs for all of them (Ray counts physical
cores, and 4 ranks + an engine exceed 2 cores; they take turns in practice: generation and training alternate).
See `engine_placements` for the layout, `Cluster.sync_weights` for the memory hand-over around a sync.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from harmony_mcore.config import Config
from harmony_mcore.mcore.policy import Policy
from harmony_mcore.rollout import transport
from harmony_mcore.rollout.engine import EngineSettings, RolloutEngine
from harmony_mcore.rollout.shm import sweep_stale_arenas
from harmony_mcore.weights.arch import ArchSpec

COLOCATED_SHARE = 0.45  # GPU fraction each colocated actor asks for (policy + engine share one GPU)


@dataclass
class Cluster:
    policies: list  # actor handles, by global rank
    engines: list
    dp_rank_of: list[int]  # data-parallel rank of each policy rank
    placement: object | None = None
    engine_settings: EngineSettings | None = None
    _weights_connected: bool = field(default=False)

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
        kind, tp = self.engine_settings.transport, self.engine_settings.tensor_parallel_size
        if self._weights_connected:
            ray.get([e.disconnect_weights.remote() for e in self.engines]
                    + [p.disconnect_weights.remote() for p in self.policies])
        endpoints = [ep for ep in self.on_all("weight_endpoint", kind) if ep]
        infos = transport.engine_init_infos(kind, endpoints=endpoints, num_engines=len(self.engines),
                                            engine_tp=tp)
        world = transport.nccl_world_size(len(self.engines), tp)
        ray.get([e.connect_weights.remote(info) for e, info in zip(self.engines, infos)]
                + [p.connect_weights.remote(kind, world) for p in self.policies])
        self._weights_connected = True

    def sync_weights(self, version: int, bucket_mb: int) -> dict[str, float]:
        """Push the policy's current weights into every engine; they then serve `version`.

        Colocated GPU engines come back from their level-2 sleep (`sleep_engines`) in two halves around the push:
        Megatron first returns its cached blocks to the driver, the engines re-allocate their weights, the push
        fills them, the ranks free their last transport buffer (CUDA IPC), and only then do the engines
        re-allocate their KV cache. Each call is a no-op where nothing sleeps (CPU, disaggregated)."""
        self.on_all("release_memory")
        ray.get([e.wake_weights.remote() for e in self.engines])
        ray.get([e.begin_weight_update.remote(version) for e in self.engines])
        stats = [s for s in self.on_all("push_weights", self.engines, bucket_mb) if s]
        ray.get([e.finish_weight_update.remote() for e in self.engines])
        self.on_all("release_memory")
        ray.get([e.wake_up.remote() for e in self.engines])
        return {"sync_bytes": sum(s["sync_bytes"] for s in stats), "sync_s": max(s["sync_s"] for s in stats)}

    def dead_engines(self, timeout_s: float = 30.0) -> list[int]:
        dead = []
        for i, engine in enumerate(self.engines):
            try:
                ray.get(engine.ping.remote(), timeout=timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                dead.append(i)
        return dead

    def sleep_engines(self) -> None:
        """Colocated GPU engines free all their GPU memory while Megatron trains (the next `sync_weights` wakes
        them; a no-op on CPU and for disaggregated engines)."""
        ray.get([e.sleep.remote() for e in self.engines])

    def shutdown(self, grace_s: float = 30.0) -> None:
        """Close the policy ranks (weight senders release their /dev/shm slots, process groups are destroyed)
        and the engines (their workers' parameter files), then kill every actor. Best effort: an actor that is
        already dead or does not answer within grace_s is killed anyway."""
        for closing in ([p.close.remote() for p in self.policies], [e.shutdown.remote() for e in self.engines]):
            try:
                ray.get(closing, timeout=grace_s)
            except Exception:  # noqa: BLE001 - dead or hung actors are killed below
                pass
        for actor in self.policies + self.engines:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if self.placement is not None:
            remove_placement_group(self.placement)
        sweep_stale_arenas()  # parameter files of engine workers that were killed (this machine's /dev/shm)


def start_ray(cfg: Config) -> None:
    if ray.is_initialized():
        return
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, log_to_driver=True)
        return
    world = cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.dp
    needed = world + cfg.rollout.engines
    # address="local": always a fresh cluster of our own, never one left running by another process.
    ray.init(address="local", num_cpus=max(cfg.ray.num_cpus or 0, needed), include_dashboard=False,
             log_to_driver=True,
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


def _gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


@dataclass(frozen=True)
class EnginePlacement:
    """Where engine i runs: its actor in placement-group bundle `bundle`, asking Ray for `num_gpus`; its
    workers on the GPUs of `gpu_bundles` (set explicitly when Ray's assignment to the actor does not cover them)."""

    bundle: int
    num_gpus: float
    gpu_bundles: tuple[int, ...]
    explicit_devices: bool


def placement_bundles(world: int, engines: int, engine_tp: int, *, on_gpu: bool, colocated: bool) -> list[dict]:
    """The placement group: one bundle per policy rank, then one per disaggregated engine (engine_tp GPUs, on one
    node, as vLLM's tensor parallelism needs) or, on CPU, one CPU per engine."""
    if not on_gpu:
        return [{"CPU": 1} for _ in range(world + engines)]
    ranks = [{"GPU": 1, "CPU": 1} for _ in range(world)]
    return ranks if colocated else ranks + [{"GPU": engine_tp, "CPU": 1} for _ in range(engines)]


def engine_placements(world: int, engines: int, engine_tp: int, *, on_gpu: bool,
                      colocated: bool) -> list[EnginePlacement]:
    """Engine i, colocated: bundles i*engine_tp .. i*engine_tp + engine_tp - 1 (mod world; the planner and config
    keep engines * engine_tp <= world), its actor asking for a COLOCATED_SHARE of the first; with engine_tp > 1
    the other GPUs are named explicitly. Disaggregated: its own bundle world + i, all of whose engine_tp GPUs Ray
    assigns to the actor. CPU: its own one-CPU bundle world + i."""
    out = []
    for i in range(engines):
        if not on_gpu:
            out.append(EnginePlacement(world + i, 0.0, (), False))
        elif colocated:
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


def engine_settings(cfg: Config, hf_dir: str) -> EngineSettings:
    r = cfg.rollout
    on_gpu = _gpus() > 0
    return EngineSettings(
        hf_dir=hf_dir, dtype=cfg.model.dtype, load_format="dummy",
        max_model_len=r.max_prompt_tokens + max(r.max_response_tokens, cfg.eval.max_response_tokens),
        tensor_parallel_size=r.engine_tp, gpu_memory_utilization=r.gpu_memory_utilization,
        enforce_eager=r.enforce_eager, seed=r.seed,
        enable_sleep_mode=on_gpu and r.placement == "colocated" and r.sleep_while_training,
        transport=transport.resolve_kind(r.transport, on_gpu=on_gpu, placement=r.placement),
        cpu_weight_layout=r.cpu_weight_layout,
    )


def launch(cfg: Config, arch: ArchSpec, total_steps: int, engine_hf_dir: str) -> Cluster:
    """Create and initialise every actor (policy ranks in parallel, then the engines)."""
    p, r = cfg.parallel, cfg.rollout
    world = p.tp * p.pp * p.dp
    on_gpu, colocated = _gpus() > 0, r.placement == "colocated"
    pg = placement_group(placement_bundles(world, r.engines, r.engine_tp, on_gpu=on_gpu, colocated=colocated),
                         strategy="PACK")
    ray.get(pg.ready())
    addr, port = ray.get(_free_address.options(scheduling_strategy=_in_bundle(pg, 0)).remote())
    actor = ray.remote(Policy)
    share = (COLOCATED_SHARE if colocated else 1.0) if on_gpu else 0
    policies = [
        actor.options(num_cpus=1, num_gpus=share, scheduling_strategy=_in_bundle(pg, rank)).remote(
            cfg, arch, total_steps, rank=rank, world=world, master_addr=addr, master_port=port, local_rank=0)
        for rank in range(world)
    ]
    ranks = ray.get([pol.ping.remote() for pol in policies])
    cluster = Cluster(policies, [], [rk["dp_rank"] for rk in ranks], pg, engine_settings(cfg, engine_hf_dir))
    cluster.engines = [_start_engine(cluster, cfg, i) for i in range(r.engines)]
    ray.get([e.ping.remote() for e in cluster.engines])
    cluster.connect_weights()
    return cluster


def _in_bundle(pg, index: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index)


def _start_engine(cluster: Cluster, cfg: Config, index: int):
    r, world = cfg.rollout, len(cluster.policies)
    on_gpu = _gpus() > 0
    place = engine_placements(world, r.engines, r.engine_tp, on_gpu=on_gpu,
                              colocated=r.placement == "colocated")[index]
    devices = None
    if place.explicit_devices:
        probes = ray.get([_bundle_gpu.options(scheduling_strategy=_in_bundle(cluster.placement, b)).remote()
                          for b in place.gpu_bundles])
        devices = visible_devices(place, dict(zip(place.gpu_bundles, probes)))
    # engine_tp > 1 spawns its own worker processes on the bundle's node (vLLM's mp executor).
    return ray.remote(RolloutEngine).options(num_cpus=0 if on_gpu else 1, num_gpus=place.num_gpus,
                                             scheduling_strategy=_in_bundle(cluster.placement, place.bundle),
                                             max_concurrency=1).remote(cluster.engine_settings, devices)


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
    return engine
