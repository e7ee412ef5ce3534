"""The direct shm weight sync (vLLM-CPU engines with plain weights): placement recorded from the loaders,
parameters moved into a /dev/shm arena, HF tensors written straight into them by the sender.

A small module with vLLM-style fused parameters and loaders stands in for the vLLM model (the real one is
covered end to end by tests/test_rollout_sync.py, whose parity checks run on direct syncs); the worker extension,
the arena, the sender and the placement recorder are the real ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from harmony_mcore.sync import make_sender
from harmony_mcore.sync.cpu_direct import (
    ARENA_PREFIX,
    CopyRecorder,
    DirectTarget,
    ParamArena,
    Piece,
    covers_whole,
)
from harmony_mcore.sync.protocol import SHM_DIR, LocalEngines, RankLayout, sweep_stale_shm
from harmony_mcore.sync.worker_ext import WeightReceiver

Q, K, V = 6, 3, 3  # fused qkv rows
VOCAB, PADDED = 6, 8


class FusedModel(torch.nn.Module):
    """vLLM-style layout: qkv rows [q; k; v], a vocabulary padded to 8 rows (padding zeroed by the loader), an
    input-sharded projection (this is TP rank `tp_rank` of 2: it keeps columns [2 r, 2 r + 2) of HF "o"), and a
    norm. `load_weights` narrows and copies like vLLM's weight loaders."""

    def __init__(self, tp_rank: int = 0, dtype=torch.float32):
        super().__init__()
        p = lambda *shape: torch.nn.Parameter(torch.zeros(*shape, dtype=dtype), requires_grad=False)
        self.qkv, self.embed, self.o, self.norm = p(Q + K + V, 4), p(PADDED, 4), p(4, 2), p(4)
        self.embed.data[VOCAB:] = 7.0  # stale padding: the loader must zero it
        self.tp_rank = tp_rank

    def load_weights(self, weights):
        offsets = {"q": (0, Q), "k": (Q, K), "v": (Q + K, V)}
        for name, w in weights:
            if name in offsets:
                self.qkv.data.narrow(0, *offsets[name]).copy_(w)
            elif name == "embed":
                self.embed[: w.shape[0]].data.copy_(w)
                self.embed[w.shape[0]:].data.fill_(0)
            elif name == "o":
                self.o.data.copy_(w.narrow(1, 2 * self.tp_rank, 2))
            elif name == "norm":
                self.norm.data.copy_(w)
        return {n for n, _ in self.named_parameters()}

    def expected(self, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        embed = torch.cat([hf["embed"], torch.zeros(PADDED - VOCAB, 4, dtype=hf["embed"].dtype)])
        return {"qkv": torch.cat([hf["q"], hf["k"], hf["v"]]), "embed": embed,
                "o": hf["o"][:, 2 * self.tp_rank: 2 * self.tp_rank + 2], "norm": hf["norm"]}


def hf_weights(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"q": (Q, 4), "k": (K, 4), "v": (V, 4), "embed": (VOCAB, 4), "o": (4, 4), "norm": (4,)}
    return {n: torch.randn(s, generator=g).to(dtype) for n, s in shapes.items()}


def groups(hf: dict[str, torch.Tensor]) -> list[list[tuple[str, torch.Tensor]]]:
    """As iter_hf_groups yields them: q/k/v together; "o" non-contiguous (a transposed view)."""
    o = hf["o"].t().contiguous().t()
    return [[("embed", hf["embed"])], [("q", hf["q"]), ("k", hf["k"]), ("v", hf["v"])], [("o", o)],
            [("norm", hf["norm"])]]


def assert_params(model: FusedModel, hf: dict[str, torch.Tensor]) -> None:
    for name, want in model.expected(hf).items():
        assert torch.equal(getattr(model, name).data, want), name


# --- the recorder ------------------------------------------------------------------------------------------


def record(model, hf):
    sources = [(n, t.contiguous()) for g in groups(hf) for n, t in g]
    recorder = CopyRecorder(sources, list(model.named_parameters()))
    with recorder:
        model.load_weights(iter(sources))
    return recorder


def test_recorder_learns_fused_padded_and_sharded_placements():
    model, hf = FusedModel(tp_rank=1), hf_weights(0)
    recorder = record(model, hf)
    assert recorder.unsupported is None
    assert_params(model, hf)  # the watched load still loads
    pieces = {p.hf_name: p for p in recorder.pieces}
    assert sorted(pieces) == ["embed", "k", "norm", "o", "q", "v"]
    assert pieces["k"] == Piece("k", "qkv", Q * 4, 0, (K, 4), (4, 1), (4, 1))
    assert pieces["embed"] == Piece("embed", "embed", 0, 0, (VOCAB, 4), (4, 1), (4, 1))
    # rank 1 keeps HF columns 2..3: source offset 2 elements, row stride 4 of the full contiguous tensor
    assert pieces["o"] == Piece("o", "o", 0, 2, (4, 2), (2, 1), (4, 1))
    assert covers_whole(pieces["q"], (Q, 4)) and not covers_whole(pieces["o"], (4, 4))
    assert Piece.from_wire(pieces["o"].to_wire()) == pieces["o"]


@pytest.mark.parametrize("loader, reason", [
    (lambda m, w: m.norm.data.copy_(w.to(torch.float16).to(torch.float32)), "_to_copy"),
    (lambda m, w: m.norm.data.copy_(w * 2), "mul"),
    (lambda m, w: m.register_buffer("scratch", w.clone()), "clone"),
])
def test_recorder_refuses_what_it_cannot_replay(loader, reason):
    model = FusedModel()
    norm = torch.randn(4)
    recorder = CopyRecorder([("norm", norm)], list(model.named_parameters()))
    with recorder:
        loader(model, norm)
    assert recorder.unsupported is not None and reason in recorder.unsupported and "'norm'" in recorder.unsupported


def test_recorder_refuses_copies_into_non_parameters():
    model, norm, scratch = FusedModel(), torch.randn(4), torch.zeros(4)
    recorder = CopyRecorder([("norm", norm)], list(model.named_parameters()))
    with recorder:
        scratch.copy_(norm)
    assert "not a parameter" in recorder.unsupported


# --- arena + target ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_arena_and_target_write_bit_exact_into_the_models_parameters(dtype):
    model, first = FusedModel(tp_rank=1, dtype=dtype), hf_weights(0, dtype)
    recorder = record(model, first)
    arena = ParamArena(list(model.named_parameters()))
    target = None
    try:
        assert arena.path.exists() and arena.path.name.startswith(f"{ARENA_PREFIX}-{os.getpid()}-")
        assert_params(model, first)  # moved, values kept
        wire = {"token": "t1", "workers": [{**arena.to_wire(), "pieces": [p.to_wire() for p in recorder.pieces],
                                            "names": sorted(first)}]}
        target = DirectTarget(wire)
        second = hf_weights(1, dtype)
        for group in groups(second):
            for name, tensor in group:
                target.write(name, tensor)
        assert_params(model, second)  # the model computes on the arena: the writes are its new weights
        assert torch.equal(model.embed.data[VOCAB:], torch.zeros(PADDED - VOCAB, 4, dtype=dtype))
        with pytest.raises(KeyError, match="no such weight"):
            target.write("lm_head", second["q"])
    finally:
        if target is not None:
            target.close()
        arena.unlink()
    assert not arena.path.exists()


def test_sweep_removes_only_files_of_dead_processes():
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    stale = SHM_DIR / f"{ARENA_PREFIX}-{int(dead.stdout)}-test"
    live = SHM_DIR / f"{ARENA_PREFIX}-{os.getppid()}-test"
    try:
        stale.touch()
        live.touch()
        assert stale in sweep_stale_shm()
        assert not stale.exists() and live.exists()
    finally:
        stale.unlink(missing_ok=True)
        live.unlink(missing_ok=True)


# --- the sender, through the real worker extension ---------------------------------------------------------


class DirectEngine:
    """RolloutEngine's shm weight-update protocol over the real worker extension and a FusedModel."""

    def __init__(self, tp_rank: int = 0):
        self.model = FusedModel(tp_rank)
        self.worker = WeightReceiver()
        self.worker.model_runner = SimpleNamespace(get_model=lambda: self.model)
        self.worker.harmony_use_plain_cpu_gemm()  # no cpu_linear modules here: just plain mode
        self.direct, self.buckets, self.written = None, 0, []

    def begin(self):
        if self.direct is None:
            self.worker.harmony_record_placement()

    def load_bucket(self, payload):
        self.buckets += 1
        return self.worker.harmony_load_shm_bucket(*payload.data)

    def finish(self, token: str):
        if self.direct is None:
            wire = self.worker.harmony_direct_target()
            assert "unsupported" not in wire, wire
            self.direct = {"token": token, "workers": [wire]}

    def direct_target(self, known_token):
        if self.direct is None:
            return None
        return {"token": known_token} if known_token == self.direct["token"] else self.direct

    def direct_written(self, names):
        self.written.append(list(names))
        return len(names)

    def release(self):
        self.worker.harmony_release_arena()


def test_shm_sender_records_then_writes_directly():
    engines = [DirectEngine(0), DirectEngine(1)]
    sender = make_sender("shm", RankLayout(rank=0, world=1), bucket_bytes=64)
    try:
        for sync in range(3):
            hf = hf_weights(sync)
            for e in engines:
                e.begin()
            stats = sender.push(lambda hf=hf: iter(groups(hf)), LocalEngines(engines))
            for e in engines:
                e.finish(token="a")
                assert_params(e.model, hf)
            assert stats["sync_bytes"] == sum(t.numel() * t.element_size() for t in hf.values())
            buckets = [e.buckets for e in engines]
            if sync == 0:  # recorded through the loaders, in buckets
                assert min(buckets) > 1 and all(not e.written for e in engines)
            else:  # straight into the parameters: no more buckets, one direct_written per sync
                assert [len(e.written) for e in engines] == [sync, sync]
                assert sorted(engines[0].written[-1]) == sorted(hf)
            for e in engines:
                e.buckets = 0
        assert all(b == 0 for b in buckets[1:])
        # a restarted engine (new token, no placement yet) is fed buckets again, then mapped anew
        restarted, engines[1] = engines[1], DirectEngine(1)
        restarted.release()
        for sync in (3, 4):
            hf = hf_weights(sync)
            for e in engines:
                e.begin()
            sender.push(lambda hf=hf: iter(groups(hf)), LocalEngines(engines))
            for e, token in zip(engines, ("a", "b")):
                e.finish(token)
                assert_params(e.model, hf)
        assert engines[1].buckets > 0 and len(engines[1].written) == 1
    finally:
        sender.close()
        for e in engines:
            e.release()
