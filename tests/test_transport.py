"""Weight transports (harmony_mcore.sync).

CPU: the shared-memory transport end to end through the sender interface and the worker extension
(bit-exact, bf16 and non-contiguous tensors included); the vLLM payloads and the "harmony_nccl" backend
classes against the installed vLLM; the CUDA IPC and NCCL choreographies over real gloo process groups (TP
gathers interleaved with the world collectives, stage turns), the CUDA/NCCL data plane replaced by recorders.
GPU (`-m gpu`, skipped without CUDA): CUDA IPC buckets opened by vLLM's own packed consumer in another
process, a CUDA IPC sync into a real vLLM engine, and (two GPUs) an NCCL sync into an engine on the other GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from harmony_mcore.checks import ConfigError
from harmony_mcore.runtime import transport_for
from harmony_mcore.sync import engine_init_infos, make_receiver, make_sender
from harmony_mcore.sync.cuda_ipc import decode_ipc_handles, encode_ipc_handles, ipc_update_info
from harmony_mcore.sync.nccl import NCCL_BACKEND, nccl_update_info, nccl_world_size, register_vllm_backends
from harmony_mcore.sync.protocol import (
    BucketPayload,
    LocalEngines,
    RankLayout,
    TransportError,
    bucket_meta,
    pack_into,
    unpack,
)
from harmony_mcore.sync.shm import ShmBucket, ShmBucketWriter, read_bucket
from harmony_mcore.sync.worker_ext import WeightReceiver
from harmony_mcore.weights import hf_dir
from harmony_mcore.weights.hf_dir import BucketPlanner
from tests.conftest import needs_gpus
from tests.dist_utils import run_gloo



# --- a small fake model: the HF groups of each pipeline stage --------------------------------------------


def stage_params(stage: int, stages: int) -> list[tuple[str, torch.Tensor]]:
    """(parameter name, full float32 tensor) of one stage, deterministic. Row counts divide by TP 2."""
    shapes = [("qkv", (24, 16)), ("o", (16, 8)), ("norm", (16,)), ("up", (32, 16))]
    if stage == 0:
        shapes = [("embed", (64, 16))] + shapes  # 2 KiB in bf16: a bucket of its own
    if stage == stages - 1:
        shapes = shapes + [("head", (96, 16))]  # 3 KiB: a larger buffer (a new IPC export)
    out = []
    for i, (name, shape) in enumerate(shapes):
        gen = torch.Generator().manual_seed(1000 * stage + i)
        out.append((f"s{stage}.{name}", torch.randn(shape, generator=gen)))
    return out


def to_hf(name: str, full: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The HF tensors of one parameter: split q/k/v, a transposed (non-contiguous) one, one float32."""
    if name.endswith("qkv"):
        return [(f"{name[:-3]}{p}", t.to(torch.bfloat16)) for p, t in zip("qkv", full.chunk(3))]
    if name.endswith(".o"):
        return [(name, full.to(torch.bfloat16).t())]
    if name.endswith("norm"):
        return [(name, full)]
    return [(name, full.to(torch.bfloat16))]


def expected_groups(stage: int, stages: int) -> list[list[tuple[str, torch.Tensor]]]:
    return [to_hf(n, t) for n, t in stage_params(stage, stages)]


def lockstep_groups(stage: int, stages: int, tp_rank: int, tp: int, group=None, dst: int = 0):
    """iter_hf_groups(..., lockstep=True) of the fake model: a real TP gather per parameter, [] on TP ranks > 0."""
    for name, full in stage_params(stage, stages):
        shard = full.chunk(tp)[tp_rank].contiguous()
        if tp == 1:
            yield to_hf(name, shard)
        elif tp_rank == 0:
            parts = [torch.empty_like(shard) for _ in range(tp)]
            dist.gather(shard, parts, dst=dst, group=group)
            yield to_hf(name, torch.cat(parts))
        else:
            dist.gather(shard, None, dst=dst, group=group)
            yield []


def expected_buckets(stages: int, bucket_bytes: int) -> list[list[str]]:
    return [list(b) for s in range(stages) for b in hf_dir.buckets(expected_groups(s, stages), bucket_bytes)]


def all_expected(stages: int) -> dict[str, torch.Tensor]:
    return {n: t for s in range(stages) for g in expected_groups(s, stages) for n, t in g}


def to_plain(t: torch.Tensor) -> tuple:
    """A tensor as (dtype, shape, bytes): crosses process boundaries without torch's shared-memory handles
    (which break when the sending process exits first)."""
    return str(t.dtype).removeprefix("torch."), tuple(t.shape), t.detach().cpu().contiguous().view(-1).view(
        torch.uint8).numpy().tobytes()


def from_plain(plain: tuple) -> torch.Tensor:
    dtype, shape, data = plain
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(getattr(torch, dtype)).view(shape)


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def assert_bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name].cpu(), t), name


# --- CPU: kinds, planning, packing -----------------------------------------------------------------------


def test_transport_for():
    assert transport_for("auto", on_gpu=False, colocated=True) == "shm"
    assert transport_for("auto", on_gpu=True, colocated=True) == "cuda_ipc"
    assert transport_for("auto", on_gpu=True, colocated=False) == "nccl"
    assert transport_for("shm", on_gpu=True, colocated=False) == "shm"
    for kind, on_gpu, colocated, match in [("nccl", False, False, "needs GPUs"),
                                           ("cuda_ipc", True, False, "own GPU"),
                                           ("nccl", True, True, "cuda_ipc"),
                                           ("tcp", True, True, "expected auto")]:
        with pytest.raises(ConfigError, match=match):
            transport_for(kind, on_gpu=on_gpu, colocated=colocated)


def test_bucket_planner_cuts_like_hf_dir_buckets():
    gen = torch.Generator().manual_seed(0)
    for max_bytes in (1, 100, 700, 5000):
        groups = [[(f"g{i}.{j}", torch.zeros(int(torch.randint(1, 90, (1,), generator=gen))))
                   for j in range(int(torch.randint(1, 4, (1,), generator=gen)))] for i in range(60)]
        planner, planned = BucketPlanner(max_bytes), []
        for group in groups + [None]:
            out = planner.add(group)
            if out:
                planned.append([n for n, _ in out])
        assert planned == [list(b) for b in hf_dir.buckets(groups, max_bytes)]


def test_pack_unpack_is_bit_exact_and_checks_alignment():
    tensors = [("a", torch.randn(3, 4).to(torch.bfloat16)), ("b", torch.randn(4, 6).t()),
               ("c", torch.arange(6, dtype=torch.int64).view(2, 3)), ("d", torch.randn(5))]
    meta = bucket_meta(tensors)
    buf = torch.empty(sum(m.nbytes for m in meta) + 7, dtype=torch.uint8)
    assert pack_into(buf, tensors) == sum(m.nbytes for m in meta)
    assert_bit_exact(dict(unpack(buf, meta)), dict(tensors))
    with pytest.raises(TransportError, match="not a multiple of its element size"):
        bucket_meta([("odd", torch.zeros(1, dtype=torch.bfloat16)), ("f32", torch.zeros(2))])


# --- CPU: the shared-memory transport through the interface ----------------------------------------------


class ShmEngine:
    """Stands in for RolloutEngine.load_bucket over shm: reads every bucket (zero-copy views) and keeps copies."""

    def __init__(self):
        self.buckets: list[list[str]] = []
        self.weights: dict[str, torch.Tensor] = {}

    def direct_target(self, known_token):
        return None  # no placement: buckets

    def load_bucket(self, payload: BucketPayload) -> int:
        got = dict(read_bucket(ShmBucket.from_wire(*payload.data)))
        assert not set(got) & set(self.weights), "a weight arrived twice"
        self.weights.update({n: t.clone() for n, t in got.items()})
        self.buckets.append(list(got))
        return len(got)


@pytest.mark.parametrize("pp", [1, 2])
def test_shm_push_round_trip_is_bit_exact(pp):
    bucket_bytes = 1024
    engines = [ShmEngine(), ShmEngine()]
    senders = [make_sender("shm", RankLayout(rank=s, world=pp, pp_rank=s, pp=pp), bucket_bytes=bucket_bytes)
               for s in range(pp)]
    try:
        for _ in range(2):  # slots are reused across syncs
            for e in engines:
                e.buckets, e.weights = [], {}
            stats = [s.push(lambda st=st: lockstep_groups(st, pp, 0, 1), LocalEngines(engines), bucket_bytes)
                     for st, s in enumerate(senders)]
            want = all_expected(pp)
            for e in engines:
                assert_bit_exact(e.weights, want)
                assert e.buckets == expected_buckets(pp, bucket_bytes)
            assert sum(s["sync_bytes"] for s in stats) == nbytes(want)
    finally:
        for s in senders:
            s.close()


def test_shm_push_roles():
    """TP > 0 ranks only run the gathers; DP > 0 ranks do nothing (their weights are DP replica 0's)."""
    consumed = []

    def groups():
        for g in lockstep_groups(0, 1, 0, 1):
            consumed.append(g)
            yield []

    engine = ShmEngine()
    tp1 = make_sender("shm", RankLayout(rank=1, world=4, tp_rank=1), bucket_bytes=1024)
    assert tp1.push(groups, LocalEngines([engine]))["sync_bytes"] == 0 and len(consumed) == 6 and not engine.buckets
    dp1 = make_sender("shm", RankLayout(rank=2, world=4, dp_rank=1), bucket_bytes=1024)
    assert dp1.push(lambda: pytest.fail("DP > 0 must not iterate"), LocalEngines([engine])) == {}


class RecordingWorker(WeightReceiver):
    """The real worker extension over a fake vLLM worker whose reload_weights keeps copies."""

    def __init__(self):
        self.loaded: dict[str, torch.Tensor] = {}

    def reload_weights(self, weights_iterator):
        self.loaded.update({n: t.clone() for n, t in weights_iterator})


class FakeLLM:
    """The parts of vllm.LLM a receiver calls, recorded."""

    def __init__(self, worker=None):
        self.worker, self.calls = worker, []

    def collective_rpc(self, method, args=()):
        self.calls.append(("collective_rpc", method))
        return [getattr(self.worker, method)(*args)]

    def init_weight_transfer_engine(self, request):
        self.calls.append(("init", request))

    def shutdown_weight_transfer_engine(self):
        self.calls.append(("shutdown",))

    def start_weight_update(self):
        self.calls.append(("start",))

    def update_weights(self, request):
        self.calls.append(("update", request))

    def finish_weight_update(self, weight_version=None):
        self.calls.append(("finish", weight_version))


def test_shm_payload_through_engine_receiver_and_worker_extension():
    tensors = {"w.bf16": torch.randn(5, 3).to(torch.bfloat16), "w.t": torch.randn(6, 4).t(),
               "w.i64": torch.arange(7), "w.f32": torch.randn(2, 2, 2)}
    writer = ShmBucketWriter("test-transport")
    try:
        receiver, llm = make_receiver("shm"), FakeLLM(RecordingWorker())
        assert receiver.llm_kwargs() == {}
        receiver.connect(llm, None)
        receiver.begin(llm)
        bucket = writer.write(tensors)
        assert receiver.load(llm, BucketPayload("shm", tuple(bucket.names), bucket.to_wire())) == 4
        receiver.finish(llm, 3)
        assert_bit_exact(llm.worker.loaded, tensors)
        assert llm.calls == [("collective_rpc", "harmony_load_shm_bucket")]
        with pytest.raises(TransportError, match="a nccl bucket"):
            receiver.load(llm, BucketPayload("nccl", (), {}))
    finally:
        writer.close()


# --- CPU: the engine side of the GPU kinds, and vLLM's view of the payloads -------------------------------


def test_engine_receiver_drives_vllms_rl_api(monkeypatch):
    monkeypatch.delenv("VLLM_ALLOW_INSECURE_SERIALIZATION", raising=False)
    receiver, llm = make_receiver("cuda_ipc"), FakeLLM()
    assert os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] == "1"
    assert receiver.llm_kwargs() == {"weight_transfer_config": {"backend": "ipc"}}
    with pytest.raises(TransportError, match="before connect"):
        receiver.begin(llm)
    receiver.connect(llm, {"packed": True})
    payload = BucketPayload("cuda_ipc", ("a",), {"names": ["a"]})
    with pytest.raises(TransportError, match="outside begin"):
        receiver.load(llm, payload)
    receiver.begin(llm)
    assert receiver.load(llm, payload) == 1
    receiver.finish(llm, 7)
    receiver.finish(llm, 8)  # no open session: nothing to close
    receiver.disconnect(llm)
    assert llm.calls == [("init", {"init_info": {"packed": True}}), ("start",),
                         ("update", {"update_info": {"names": ["a"]}}), ("finish", "7"), ("shutdown",)]


def test_engine_init_infos():
    assert engine_init_infos("shm", endpoints=[], num_engines=2, engine_tp=1) == [None, None]
    assert engine_init_infos("cuda_ipc", endpoints=[], num_engines=2, engine_tp=2) == [{"packed": True}] * 2
    eps = [{"stage": 1, "host": "b", "port": 2, "chunk_bytes": 64, "num_buffers": 2},
           {"stage": 0, "host": "a", "port": 1, "chunk_bytes": 64, "num_buffers": 2}]
    infos = engine_init_infos("nccl", endpoints=eps, num_engines=3, engine_tp=2)
    assert [i["rank_offset"] for i in infos] == [1, 3, 5]  # engine e's worker w: rank 1 + 2e + w
    assert {i["world_size"] for i in infos} == {nccl_world_size(3, 2)} == {7}
    assert infos[0]["endpoints"] == [["a", 1], ["b", 2]] and infos[0]["packed_buffer_size_bytes"] == 64
    with pytest.raises(TransportError, match="one endpoint per pipeline stage"):
        engine_init_infos("nccl", endpoints=eps[:1], num_engines=1, engine_tp=1)
    with pytest.raises(TransportError, match="disagree"):
        engine_init_infos("nccl", endpoints=[eps[0], dict(eps[1], chunk_bytes=32)], num_engines=1,
                          engine_tp=1)


def test_vllm_accepts_the_payloads(monkeypatch):
    """The installed vLLM parses what the senders produce, and its RPC encoder carries it without pickling."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    from vllm.distributed.weight_transfer.ipc_engine import (
        IPCWeightTransferInitInfo,
        IPCWeightTransferUpdateInfo,
    )
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    from harmony_mcore.sync import nccl_vllm

    monkeypatch.delenv("VLLM_ALLOW_INSECURE_SERIALIZATION", raising=False)
    meta = bucket_meta([("q", torch.zeros(4, 2, dtype=torch.bfloat16)), ("n", torch.zeros(3))])
    handles = {"GPU-x": (torch.Tensor, torch.Size([12]), (1,), 0, torch.UntypedStorage, torch.uint8, 0, b"h",
                         12, 0, False, b"r", 0, b"e", True)}
    ipc = ipc_update_info(meta, encode_ipc_handles(handles))
    eps = [{"stage": 0, "host": "10.0.0.1", "port": 1234, "chunk_bytes": 1 << 20, "num_buffers": 2}]
    nccl_init = engine_init_infos("nccl", endpoints=eps, num_engines=2, engine_tp=1)[1]
    nccl = nccl_update_info(meta, 0)
    enc, dec = MsgpackEncoder(), MsgpackDecoder()
    for data in (ipc, nccl, nccl_init):
        assert dec.decode(enc.encode({"update_info": data}))["update_info"] == data

    with pytest.raises(ValueError, match="VLLM_ALLOW_INSECURE_SERIALIZATION"):
        IPCWeightTransferUpdateInfo(**ipc)
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    parsed = IPCWeightTransferUpdateInfo(**ipc)
    assert parsed.ipc_handles == handles and parsed.tensor_sizes == [16, 12]
    assert parsed.shapes == [[4, 2], [3]]
    assert IPCWeightTransferInitInfo(**engine_init_infos("cuda_ipc", endpoints=[], num_engines=1,
                                                         engine_tp=1)[0]).packed

    register_vllm_backends()
    register_vllm_backends()  # idempotent
    cls = WeightTransferEngineFactory._registry[NCCL_BACKEND]()
    assert cls is nccl_vllm.HarmonyNCCLWeightTransferEngine and issubclass(cls, NCCLWeightTransferEngine)
    init = cls.init_info_cls(**nccl_init)
    assert (init.rank_offset, init.world_size, init.packed_buffer_size_bytes) == (2, 3, 1 << 20)
    assert cls.update_info_cls(**nccl).stage == 0 and cls.update_info_cls(**nccl).dtype_names == ["bfloat16",
                                                                                                   "float32"]


def test_harmony_nccl_engine_uses_one_group_per_stage(monkeypatch):
    from vllm.config.weight_transfer import WeightTransferConfig
    from vllm.distributed.weight_transfer import nccl_common, nccl_engine

    class Comm:
        def __init__(self, info):
            self.info, self.destroyed = info, False

        def destroy(self):
            self.destroyed = True

    received = []
    monkeypatch.setattr(nccl_common, "worker_init_process_group", lambda info, parallel_config: Comm(info))
    monkeypatch.setattr(nccl_engine.NCCLWeightTransferEngine, "receive_weights",
                        lambda self, info: received.append((self.model_update_group, info.names)))
    from harmony_mcore.sync.nccl_vllm import HarmonyNCCLWeightTransferEngine as cls

    engine = cls(WeightTransferConfig(backend=NCCL_BACKEND),
                 SimpleNamespace(parallel_config=SimpleNamespace(), model_config=None), torch.device("cpu"),
                 torch.nn.Linear(1, 1))
    eps = [{"stage": s, "host": f"h{s}", "port": 100 + s, "chunk_bytes": 4096, "num_buffers": 2}
           for s in (1, 0)]
    engine.init_transfer_engine(engine.parse_init_info(
        engine_init_infos("nccl", endpoints=eps, num_engines=2, engine_tp=1)[1]))
    groups = list(engine.stage_groups)
    joined = [(g.info.master_address, g.info.master_port, g.info.rank_offset, g.info.world_size)
              for g in groups]
    assert joined == [("h0", 100, 2, 3), ("h1", 101, 2, 3)]
    assert engine.packed and engine.packed_buffer_size_bytes == 4096
    meta = bucket_meta([("x", torch.zeros(2))])
    for stage in (1, 0):
        engine.receive_weights(engine.parse_update_info(nccl_update_info(meta, stage)))
        assert received[-1] == (groups[stage], ["x"])
    with pytest.raises(RuntimeError, match="stage 2"):
        engine.receive_weights(engine.parse_update_info(nccl_update_info(meta, 2)))
    engine.shutdown()
    assert all(g.destroyed for g in groups) and engine.stage_groups == []


def test_module_imports_without_vllm_ray_or_megatron():
    code = ("import sys, harmony_mcore.sync, harmony_mcore.sync.worker_ext\n"
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'vllm', 'ray', 'megatron'})\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# --- CPU, multi-process: the GPU choreographies over gloo -------------------------------------------------


def _coords(rank: int, tp: int, dp: int) -> tuple[int, int, int]:
    """Megatron order: TP fastest, then DP, then PP. -> (tp_rank, dp_rank, pp_rank)."""
    return rank % tp, (rank // tp) % dp, rank // (tp * dp)


def _tp_group(rank: int, world: int, tp: int):
    mine = None
    for base in range(0, world, tp):  # every rank creates every group, in the same order
        ranks = list(range(base, base + tp))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = (group, ranks[0])
    return mine


class RecordingExporter:
    """The CUDA IPC exporter's test double: a fake GPU per rank; records what lands in this rank's buffer."""

    def __init__(self, rank: int):
        self.uuid, self.exports, self.buckets, self.collects = f"GPU-fake-{rank}", 0, [], 0

    def export(self, buf):
        self.exports += 1
        return ("handle", self.uuid, self.exports, buf.numel())

    def ready(self, view, meta):
        self.buckets.append([(n, to_plain(t)) for n, t in unpack(view, meta)])

    def collect(self):
        self.collects += 1


class RecordingIpcEngine:
    def __init__(self):
        self.payloads = []

    def load_bucket(self, payload: BucketPayload) -> int:
        handles = decode_ipc_handles(payload.data["ipc_handles_pickled"])
        self.payloads.append((payload.kind, list(payload.names), sorted(handles),
                              payload.data["tensor_sizes"]))
        return len(payload.names)


def _ipc_rank(rank: int, world: int, tp: int, pp: int, dp: int, bucket_bytes: int):
    tp_rank, dp_rank, pp_rank = _coords(rank, tp, dp)
    group, dst = _tp_group(rank, world, tp)
    layout = RankLayout(rank=rank, world=world, tp_rank=tp_rank, pp_rank=pp_rank, pp=pp, dp_rank=dp_rank)
    exporter, engine = RecordingExporter(rank), RecordingIpcEngine()
    sender = make_sender("cuda_ipc", layout, bucket_bytes=bucket_bytes, exporter=exporter)
    syncs = []
    for _ in range(2):
        exporter.buckets, exporter.exports, engine.payloads = [], 0, []
        stats = sender.push(lambda: lockstep_groups(pp_rank, pp, tp_rank, tp, group, dst), LocalEngines([engine]),
                            bucket_bytes)
        collects = exporter.collects
        sender.release()  # the engines finished the update: the last bucket goes now, not at the next push
        stats |= {"freed": sender._buf is None and exporter.collects == collects + 1}
        syncs.append((exporter.buckets, exporter.exports, engine.payloads, stats))
    return syncs


@pytest.mark.parametrize("tp,pp,dp", [(2, 2, 1), (1, 2, 2), (2, 1, 2)])
def test_cuda_ipc_choreography_over_gloo(tp, pp, dp):
    """Every rank (one per GPU) ends up with every bucket of every stage, bit-exact, cut like hf_dir.buckets;
    rank 0 hands each bucket to the engines once, with every GPU's handle; buffers are exported once per sync
    plus once when a bucket outgrows them."""
    world, bucket_bytes = tp * pp * dp, 1024
    results = run_gloo(world, _ipc_rank, tp, pp, dp, bucket_bytes, timeout=300)
    want, cuts = all_expected(pp), expected_buckets(pp, bucket_bytes)
    total = nbytes(want)
    uuids = sorted(f"GPU-fake-{r}" for r in range(world))
    for sync in range(2):
        for rank, syncs in enumerate(results):
            buckets, exports, payloads, stats = syncs[sync]
            assert [[n for n, _ in b] for b in buckets] == cuts
            assert_bit_exact({n: from_plain(t) for b in buckets for n, t in b}, want)
            assert exports == 2  # the 2 KiB embed bucket, then the 3 KiB head outgrows it
            assert stats["freed"], "release() drops the buffer and collects the IPC blocks the engines let go"
            if rank == 0:
                assert [p[1] for p in payloads] == cuts
                assert all(p[0] == "cuda_ipc" and p[2] == uuids for p in payloads)
            else:
                assert payloads == []
        assert sum(s[sync][3]["sync_bytes"] for s in results) == total


class FakeNcclGroup:
    def __init__(self, host, port, world):
        self.address, self.world, self.destroyed = (host, port), world, False

    def destroy(self):
        self.destroyed = True


class LoggingEngine:
    def __init__(self, log: str):
        self.log = log

    def load_bucket(self, payload: BucketPayload) -> int:
        _append(self.log, f"load {payload.data['stage']} {' '.join(payload.names)}")
        return len(payload.names)


def _append(path: str, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")


def _nccl_rank(rank: int, world: int, tp: int, pp: int, log: str, bucket_bytes: int):
    tp_rank, _, pp_rank = _coords(rank, tp, 1)
    group, dst = _tp_group(rank, world, tp)
    layout = RankLayout(rank=rank, world=world, tp_rank=tp_rank, pp_rank=pp_rank, pp=pp,
                        prev_stage_rank=rank - tp if pp_rank > 0 else None,
                        next_stage_rank=rank + tp if pp_rank < pp - 1 else None)

    def broadcast(nccl_group, bucket, chunk_bytes, num_buffers):
        assert isinstance(nccl_group, FakeNcclGroup) and chunk_bytes == bucket_bytes and num_buffers == 2
        time.sleep(0.05)  # a slow stage 0 would let an unsynchronised stage 1 overtake it
        _append(log, f"bcast {pp_rank} {' '.join(bucket)}")

    sender = make_sender("nccl", layout, bucket_bytes=bucket_bytes, group_factory=FakeNcclGroup,
                         broadcaster=broadcast)
    endpoint = sender.endpoint()
    sender.connect(nccl_world_size(2, 1))
    nccl_group = sender._group
    stats = sender.push(lambda: lockstep_groups(pp_rank, pp, tp_rank, tp, group, dst),
                        LocalEngines([LoggingEngine(log)]), bucket_bytes)
    sender.close()
    return endpoint, stats, None if nccl_group is None else (nccl_group.world, nccl_group.destroyed)


def test_nccl_choreography_over_gloo(tmp_path):
    """Stage senders take turns (all of stage 0 before stage 1), each bucket is announced to the engines then
    broadcast, cut like hf_dir.buckets; only TP 0 ranks are senders."""
    tp, pp, bucket_bytes = 2, 2, 1024
    log = str(tmp_path / "log")
    results = run_gloo(tp * pp, _nccl_rank, tp, pp, log, bucket_bytes, timeout=300)
    endpoints = [r[0] for r in results]
    assert [e is not None for e in endpoints] == [True, False, True, False]
    assert [e["stage"] for e in endpoints if e] == [0, 1]
    assert [r[2] for r in results] == [(3, True), None, (3, True), None]
    lines = Path(log).read_text().splitlines()
    stages = [int(line.split()[1]) for line in lines]
    assert stages == sorted(stages), "stage 1 broadcast while stage 0 was still sending"
    cuts = expected_buckets(pp, bucket_bytes)
    assert [line.split()[2:] for line in lines if line.startswith("load")] == cuts
    assert [line.split()[2:] for line in lines if line.startswith("bcast")] == cuts
    assert [line.split()[0] for line in lines] == ["load", "bcast"] * len(cuts)
    want = all_expected(pp)
    assert sum(r[1]["sync_bytes"] for r in results) == nbytes(want)


# --- GPU ---------------------------------------------------------------------------------------------------


def _ipc_consumer(requests, replies) -> None:
    """Another process: open each bucket with vLLM's own packed CUDA IPC consumer, send back CPU copies."""
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferUpdateInfo
    from vllm.distributed.weight_transfer.packed_tensor import PackedBufferImporter, packed_ipc_consumer

    torch.cuda.set_device(0)
    importer = PackedBufferImporter()
    while (data := requests.get()) is not None:
        try:
            info = IPCWeightTransferUpdateInfo(**data)
            got = packed_ipc_consumer(info.ipc_handles, info.names, info.shapes, info.dtype_names,
                                      info.tensor_sizes, 0, importer)
            replies.put(("ok", {n: to_plain(t) for n, t in got}))
        except Exception:  # noqa: BLE001 - reported to the test
            replies.put(("error", traceback.format_exc()))
    importer.close()


@needs_gpus(1)
def test_cuda_ipc_buckets_open_in_vllms_consumer():
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    requests, replies = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_ipc_consumer, args=(requests, replies))
    child.start()
    received: dict[str, torch.Tensor] = {}

    class Engine:
        def load_bucket(self, payload):
            requests.put(payload.data)
            status, got = replies.get(timeout=300)
            assert status == "ok", got
            received.update({n: from_plain(t) for n, t in got.items()})
            return len(got)

    try:
        torch.cuda.set_device(0)
        groups = [[(n, t.cuda()) for n, t in g] for g in expected_groups(0, 1)]
        sender = make_sender("cuda_ipc", RankLayout(), bucket_bytes=1024)
        for _ in range(2):  # a fresh buffer (and handle) per sync
            received.clear()
            stats = sender.push(lambda: iter(groups), LocalEngines([Engine()]), 1024)
            assert_bit_exact(received, all_expected(1))
            assert stats["sync_bytes"] == nbytes(all_expected(1))
        sender.close()
    finally:
        requests.put(None)
        child.join(timeout=60)
        if child.is_alive():
            child.kill()


def doubled_hf_groups(path, device: str):
    """Every HF tensor of the tiny model times 2, grouped by table rule (q/k/v together), on `device`."""
    from harmony_mcore.weights import table
    from harmony_mcore.weights.arch import ArchSpec

    arch, hf = ArchSpec.from_hf_dir(path), hf_dir.HFWeights(path)
    for rule in table.rules_for(arch):
        for layer in (range(arch.num_layers) if rule.per_layer else [None]):
            yield [(n, (hf.get(n) * 2).to(device)) for n in rule.hf_names(layer)]


PROBES = ("model.embed_tokens.weight", "model.layers.0.self_attn.qkv_proj.weight",
          "model.layers.1.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight")


def _llm(path, receiver):
    from vllm import LLM

    return LLM(model=str(path), dtype="float32", max_model_len=256, gpu_memory_utilization=0.25,
               enforce_eager=True, enable_chunked_prefill=False,
               worker_extension_cls="harmony_mcore.sync.worker_ext.WeightReceiver",
               **receiver.llm_kwargs())


@needs_gpus(1)
def test_cuda_ipc_sync_into_a_vllm_engine(tiny_qwen3):
    receiver = make_receiver("cuda_ipc")
    llm = _llm(tiny_qwen3, receiver)
    receiver.connect(llm, engine_init_infos("cuda_ipc", endpoints=[], num_engines=1, engine_tp=1)[0])
    before = {p: llm.collective_rpc("harmony_weight_sum", args=(p,))[0] for p in PROBES}

    class Engine:
        def load_bucket(self, payload):
            return receiver.load(llm, payload)

    torch.cuda.set_device(0)
    sender = make_sender("cuda_ipc", RankLayout(), bucket_bytes=64 << 10)
    receiver.begin(llm)
    stats = sender.push(lambda: doubled_hf_groups(tiny_qwen3, "cuda"), LocalEngines([Engine()]), 64 << 10)
    receiver.finish(llm, 1)
    after = {p: llm.collective_rpc("harmony_weight_sum", args=(p,))[0] for p in PROBES}
    for p in PROBES:
        assert after[p] == pytest.approx(2 * before[p], rel=1e-5, abs=1e-6), p
    assert llm.get_weight_version() == "1" and stats["sync_bytes"] > 0
    sender.close()


def _nccl_engine_server(path: str, requests, replies) -> None:
    """Another process on GPU 1: a vLLM engine serving receiver calls in order."""
    os.environ["CUDA_VISIBLE_DEVICES"] = "1"
    try:
        receiver = make_receiver("nccl")
        llm = _llm(path, receiver)
        replies.put(("ok", None))
    except Exception:  # noqa: BLE001 - reported to the test
        replies.put(("error", traceback.format_exc()))
        return
    while (command := requests.get()) is not None:
        op, arg = command
        try:
            out = {"connect": lambda: receiver.connect(llm, arg), "begin": lambda: receiver.begin(llm),
                   "load": lambda: receiver.load(llm, arg), "finish": lambda: receiver.finish(llm, arg),
                   "sum": lambda: llm.collective_rpc("harmony_weight_sum", args=(arg,))[0],
                   "disconnect": lambda: receiver.disconnect(llm)}[op]()
            replies.put(("ok", out))
        except Exception:  # noqa: BLE001
            replies.put(("error", traceback.format_exc()))


class EngineProcess:
    """An asynchronous handle on _nccl_engine_server: `load_bucket(payload)` returns a Future (LocalEngines
    waits on it)."""

    def __init__(self, path):
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.requests, self.replies = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=_nccl_engine_server, args=(str(path), self.requests, self.replies))
        self.proc.start()
        self.pool = ThreadPoolExecutor(1)  # one request at a time, in order, like an actor
        self.call("ready")  # the engine is up

    def _round_trip(self, op, arg):
        if op != "ready":
            self.requests.put((op, arg))
        status, out = self.replies.get(timeout=600)
        if status != "ok":
            raise RuntimeError(out)
        return out

    def call(self, op: str, arg=None, wait: bool = True):
        future: Future = self.pool.submit(self._round_trip, op, arg)
        return future.result() if wait else future

    def load_bucket(self, payload):
        return self.call("load", payload, wait=False)

    def close(self):
        self.requests.put(None)
        self.proc.join(timeout=60)
        if self.proc.is_alive():
            self.proc.kill()
        self.pool.shutdown()


@needs_gpus(2)
def test_nccl_sync_into_a_vllm_engine_on_another_gpu(tiny_qwen3):
    """Needs harmony_mcore.sync.worker_ext to register the "harmony_nccl" backend in the vLLM worker."""
    engine = EngineProcess(tiny_qwen3)
    try:
        torch.cuda.set_device(0)
        sender = make_sender("nccl", RankLayout(), bucket_bytes=64 << 10)
        info = engine_init_infos("nccl", endpoints=[sender.endpoint()], num_engines=1, engine_tp=1)[0]
        connecting = engine.call("connect", info, wait=False)
        sender.connect(nccl_world_size(1, 1))
        connecting.result(timeout=600)
        before = {p: engine.call("sum", p) for p in PROBES}
        engine.call("begin")
        stats = sender.push(lambda: doubled_hf_groups(tiny_qwen3, "cuda"), LocalEngines([engine]), 64 << 10)
        engine.call("finish", 1)
        after = {p: engine.call("sum", p) for p in PROBES}
        for p in PROBES:
            assert after[p] == pytest.approx(2 * before[p], rel=1e-5, abs=1e-6), p
        assert stats["sync_bytes"] > 0
        engine.call("disconnect")
        sender.close()
    finally:
        engine.close()
