"""Where engines run on GPU clusters and how colocated engines hand their memory over around a weight sync.

The placement logic is pure (harmony_mcore.cluster); the sleep/wake sequence is RolloutEngine's own code driving a
recording stand-in for vLLM's LLM, whose sleep mode exists only on GPUs.
"""

from __future__ import annotations

import pytest

from harmony_mcore.cluster import (
    COLOCATED_SHARE,
    EnginePlacement,
    engine_placements,
    placement_bundles,
    visible_devices,
)
from harmony_mcore.config import load_config
from harmony_mcore.rollout.engine import EngineSettings, RolloutEngine
from harmony_mcore.runtime import CPU, Runtime, decide

GPU_COLOCATED = Runtime(device="cuda", colocated=True, transport="cuda_ipc", sleep_engines=True)
GPU_DISAGGREGATED = Runtime(device="cuda", colocated=False, transport="nccl")


def test_the_runtime_is_decided_once_from_config_and_gpus():
    cfg = load_config(None, ["model.preset=qwen3-1.7b"])
    assert decide(cfg, gpus=0) == CPU and CPU.name == "cpu" and CPU.transport == "shm"
    assert decide(cfg, gpus=8) == GPU_COLOCATED and GPU_COLOCATED.name == "gpu-colocated"
    apart = decide(load_config(None, ["model.preset=qwen3-1.7b", "rollout.placement=disaggregated"]), gpus=16)
    assert apart == GPU_DISAGGREGATED and apart.name == "gpu-disaggregated"
    awake = decide(load_config(None, ["model.preset=qwen3-1.7b", "rollout.sleep_while_training=false"]), gpus=8)
    assert not awake.sleep_engines
    fallback = decide(load_config(None, ["model.preset=qwen3-1.7b", "rollout.transport=shm"]), gpus=8)
    assert fallback.transport == "shm" and fallback.on_gpu


def test_colocated_engines_span_their_own_policy_gpus():
    places = engine_placements(8, 4, 2, GPU_COLOCATED)
    assert [p.gpu_bundles for p in places] == [(0, 1), (2, 3), (4, 5), (6, 7)], "no two engines share a GPU"
    assert all(p.bundle == p.gpu_bundles[0] and p.num_gpus == COLOCATED_SHARE for p in places)
    assert all(p.explicit_devices for p in places), "Ray cannot assign a second GPU share: named explicitly"
    single = engine_placements(4, 4, 1, GPU_COLOCATED)
    assert [(p.bundle, p.gpu_bundles, p.explicit_devices) for p in single] == [
        (i, (i,), False) for i in range(4)], "one GPU each: Ray's own assignment"
    assert len(placement_bundles(8, 4, 2, GPU_COLOCATED)) == 8, "no GPUs beyond the policy's"


def test_disaggregated_engines_get_bundles_of_engine_tp_gpus():
    bundles = placement_bundles(4, 2, 4, GPU_DISAGGREGATED)
    assert bundles == [{"GPU": 1, "CPU": 1}] * 4 + [{"GPU": 4, "CPU": 1}] * 2
    places = engine_placements(4, 2, 4, GPU_DISAGGREGATED)
    assert places == [EnginePlacement(4, 4.0, (4,), False), EnginePlacement(5, 4.0, (5,), False)], \
        "the actor asks for all engine_tp GPUs of its bundle, so Ray sets CUDA_VISIBLE_DEVICES to exactly them"


def test_cpu_engines_get_a_cpu_each():
    assert placement_bundles(2, 1, 1, CPU) == [{"CPU": 1}] * 3
    assert engine_placements(2, 1, 1, CPU) == [EnginePlacement(2, 0.0, (), False)]


def test_visible_devices_from_bundle_probes():
    place = engine_placements(8, 4, 2, GPU_COLOCATED)[1]
    probes = {2: ("10.0.0.1", "2"), 3: ("10.0.0.1", "3")}
    assert visible_devices(place, probes) == "2,3"
    with pytest.raises(RuntimeError, match="span nodes"):
        visible_devices(place, {2: ("10.0.0.1", "7"), 3: ("10.0.0.2", "0")})
    assert visible_devices(engine_placements(4, 4, 1, GPU_COLOCATED)[0], {}) is None


class SleepModeLLM:
    """vLLM's LLM as far as the memory hand-over goes: records sleep/wake calls."""

    def __init__(self):
        self.calls = []

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags or ())))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


def _engine(sleep_mode: bool) -> RolloutEngine:
    engine = RolloutEngine.__new__(RolloutEngine)  # vLLM's GPU sleep mode cannot start here: its LLM recorded
    engine.settings = EngineSettings(hf_dir="unused", runtime=GPU_COLOCATED if sleep_mode else GPU_DISAGGREGATED)
    engine.llm, engine.asleep, engine.weights_valid = SleepModeLLM(), False, True
    engine.version, engine._received, engine._pending_version = 0, None, None
    engine._expected = frozenset()

    class Receiver:
        def begin(self, llm): pass

        def finish(self, llm, version, complete): pass

    engine.receiver = Receiver()
    return engine


def test_colocated_engine_sleeps_level_2_and_wakes_weights_then_kv_cache():
    engine = _engine(sleep_mode=True)
    engine.sleep()
    with pytest.raises(RuntimeError, match="sleeping"):
        engine.generate([], None)
    engine.wake_weights()
    with pytest.raises(RuntimeError, match="weight sync first"):
        engine.wake_up()  # the discarded weights were never refilled
    engine.begin_weight_update(1)
    engine.finish_weight_update()
    engine.wake_up()
    assert engine.llm.calls == [("sleep", 2), ("wake_up", ("weights",)), ("wake_up", ("kv_cache", "scheduling"))], \
        "weights dropped, not copied to host; KV cache back only after the sync"
    assert engine.version == 1 and not engine.asleep and engine.weights_valid


def test_engines_without_sleep_mode_only_reset_their_prefix_cache():
    engine = _engine(sleep_mode=False)
    engine.sleep()
    engine.wake_weights()
    engine.begin_weight_update(1)
    engine.finish_weight_update()
    engine.wake_up()
    assert engine.llm.calls == [("reset_prefix_cache",)]
