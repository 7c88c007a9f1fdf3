"""A Megatron parallel layout (TP, SP, PP, VPP, EP, expert-TP, DP) and its process groups."""

from dataclasses import dataclass
from typing import Optional

from megatron.core import parallel_state


@dataclass(frozen=True)
class ParallelLayout:
    """How a run splits its model over ranks, in Megatron's terms.

    Data parallelism takes the ranks left over: `data_parallel_size(world_size)`.
    `expert_tensor_parallel_size=None` means Megatron's default (equal to `tensor_parallel_size`).
    """

    tensor_parallel_size: int = 1
    sequence_parallel: bool = False
    pipeline_parallel_size: int = 1
    virtual_pipeline_parallel_size: Optional[int] = None
    expert_parallel_size: int = 1
    expert_tensor_parallel_size: Optional[int] = None

    def __post_init__(self):
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "expert_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ParallelLayout.{name} must be >= 1, got {getattr(self, name)}")
        if self.sequence_parallel and self.tensor_parallel_size == 1:
            raise ValueError("sequence_parallel needs tensor_parallel_size > 1")
        if self.virtual_pipeline_parallel_size is not None and self.pipeline_parallel_size == 1:
            raise ValueError("virtual_pipeline_parallel_size needs pipeline_parallel_size > 1")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        """Dense data-parallel size for `world_size` ranks; raises if the layout does not divide it."""
        if world_size % self.model_parallel_size:
            raise ValueError(
                f"world size {world_size} is not divisible by TP x PP = {self.model_parallel_size}"
            )
        expert_tp = self.expert_tensor_parallel_size or self.tensor_parallel_size
        expert_ranks = self.expert_parallel_size * expert_tp * self.pipeline_parallel_size
        if world_size % expert_ranks:
            raise ValueError(
                f"world size {world_size} is not divisible by EP x expert-TP x PP = {expert_ranks}"
            )
        return world_size // self.model_parallel_size

    @property
    def name(self) -> str:
        """Short name such as `tp2-sp`, `pp2-vpp2`, `tp2-ep2`; `ws1` for no model parallelism."""
        parts = []
        if self.tensor_parallel_size > 1:
            parts.append(f"tp{self.tensor_parallel_size}" + ("-sp" if self.sequence_parallel else ""))
        if self.pipeline_parallel_size > 1:
            parts.append(f"pp{self.pipeline_parallel_size}")
        if self.virtual_pipeline_parallel_size:
            parts.append(f"vpp{self.virtual_pipeline_parallel_size}")
        if self.expert_parallel_size > 1:
            parts.append(f"ep{self.expert_parallel_size}")
        if self.expert_tensor_parallel_size is not None:
            parts.append(f"etp{self.expert_tensor_parallel_size}")
        return "-".join(parts) or "ws1"

    def transformer_config_fields(self) -> dict:
        """The fields of Megatron's TransformerConfig (ModelParallelConfig) this layout sets."""
        return dict(
            tensor_model_parallel_size=self.tensor_parallel_size,
            sequence_parallel=self.sequence_parallel,
            pipeline_model_parallel_size=self.pipeline_parallel_size,
            virtual_pipeline_model_parallel_size=self.virtual_pipeline_parallel_size,
            expert_model_parallel_size=self.expert_parallel_size,
            expert_tensor_parallel_size=self.expert_tensor_parallel_size,
        )

    def initialize(self) -> None:
        """Create Megatron's process groups for this layout (torch.distributed must be initialized)."""
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=self.tensor_parallel_size,
            pipeline_model_parallel_size=self.pipeline_parallel_size,
            virtual_pipeline_model_parallel_size=self.virtual_pipeline_parallel_size,
            expert_model_parallel_size=self.expert_parallel_size,
            expert_tensor_parallel_size=self.expert_tensor_parallel_size,
        )
