"""The engine side of the nccl wire inside vLLM's workers: vLLM's dense NCCL weight-transfer engine with one
communicator per pipeline stage. vLLM's WeightTransferEngineFactory imports this module by path (backend
"harmony_nccl", registered by harmony_mcore.sync.nccl.register_vllm_backends); it imports vLLM.

Differences from NCCLWeightTransferEngine: the init info lists one [address, port] per stage and each worker
joins every stage's group (the same rank in each: rank_offset + its rank); the update info names the stage whose
group carries the bucket. Receiving (packed consumer -> model.load_weights) and the layer-wise reload session
are the parent's.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.distributed.weight_transfer import nccl_common
from vllm.distributed.weight_transfer.base import WeightTransferInitInfo
from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine, NCCLWeightTransferUpdateInfo
from vllm.distributed.weight_transfer.packed_tensor import (
    DEFAULT_PACKED_BUFFER_SIZE_BYTES,
    DEFAULT_PACKED_NUM_BUFFERS,
)


@dataclass
class StageGroupsInitInfo(WeightTransferInitInfo):
    endpoints: list  # [[address, port], ...] in stage order
    rank_offset: int
    world_size: int
    packed: bool = True
    packed_buffer_size_bytes: int = DEFAULT_PACKED_BUFFER_SIZE_BYTES
    packed_num_buffers: int = DEFAULT_PACKED_NUM_BUFFERS

    def __post_init__(self) -> None:
        if not self.endpoints or any(len(e) != 2 for e in self.endpoints):
            raise ValueError(f"endpoints must be [[address, port], ...] per stage: {self.endpoints!r}")
        if not 1 <= self.rank_offset < self.world_size:
            raise ValueError(f"rank_offset {self.rank_offset} outside [1, world_size={self.world_size})")


@dataclass
class StageUpdateInfo(NCCLWeightTransferUpdateInfo):
    stage: int = 0


class HarmonyNCCLWeightTransferEngine(NCCLWeightTransferEngine):
    init_info_cls = StageGroupsInitInfo
    update_info_cls = StageUpdateInfo

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stage_groups: list = []

    def init_transfer_engine(self, init_info: StageGroupsInitInfo) -> None:
        self.shutdown()  # a reconnect (after an engine restart) replaces the old groups
        self.packed = init_info.packed
        self.packed_buffer_size_bytes = init_info.packed_buffer_size_bytes
        self.packed_num_buffers = init_info.packed_num_buffers
        for address, port in init_info.endpoints:
            one = nccl_common.NCCLWeightTransferInitInfo(
                master_address=str(address), master_port=int(port), rank_offset=init_info.rank_offset,
                world_size=init_info.world_size, packed=init_info.packed,
                packed_buffer_size_bytes=init_info.packed_buffer_size_bytes,
                packed_num_buffers=init_info.packed_num_buffers)
            self.stage_groups.append(nccl_common.worker_init_process_group(one, self.parallel_config))
        self.model_update_group = self.stage_groups[0]

    def receive_weights(self, update_info: StageUpdateInfo) -> None:
        if not 0 <= update_info.stage < len(self.stage_groups):
            raise RuntimeError(f"a bucket of pipeline stage {update_info.stage}, but "
                               f"{len(self.stage_groups)} stage groups are connected")
        self.model_update_group = self.stage_groups[update_info.stage]
        super().receive_weights(update_info)

    def shutdown(self) -> None:
        for group in self.stage_groups:
            group.destroy()
        self.stage_groups = []
        self.model_update_group = None
