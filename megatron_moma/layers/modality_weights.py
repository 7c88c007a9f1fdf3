"""Per-modality linear and norm weights applied to the rows of each modality.

A component is *untied* (one weight per modality, named after it: `weight.text`,
`weight.image`) or *tied* (one `weight.shared` for every token): the same module serves MoT's
untied layers and the dense layer they are compared with.

Row selection uses the micro-batch's `ModalityIndex`: rows are grouped by modality (one row
gather), each modality's contiguous block is multiplied by that modality's weight, and the blocks
are put back in token order (one gather). Callers that chain several per-modality steps (the
MoT sublayers) group once, run every step on the grouped rows, and ungroup once.
"""

from typing import Sequence

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import (
    _initialize_affine_weight_cpu,
    _initialize_affine_weight_gpu,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from megatron_moma.modality.context import ModalityAware
from megatron_moma.modality.index import ModalityIndex

SHARED = "shared"


def group_names(config, untied: bool) -> Sequence[str]:
    """Weight-set names: the modality names when untied, else the one shared set."""
    return config.modality_layout.names if untied else (SHARED,)


def apply_per_modality(fn, rows: torch.Tensor, index: ModalityIndex, names: Sequence[str]):
    """Apply `fn(name, rows_of_that_modality)` per weight set; rows [n, ...] in token order."""
    if len(names) == 1:
        return fn(names[0], rows)
    return index.ungroup(apply_grouped(fn, index.group(rows), index, names))


def apply_grouped(fn, grouped: torch.Tensor, index: ModalityIndex, names: Sequence[str]):
    """`apply_per_modality` on rows already grouped by modality (`index.group`); the output
    [n, ...] stays grouped. Padding rows (modality id `index.num_modalities`, grouped last)
    get the first weight set: their outputs are dropped by whoever padded."""
    if len(names) == 1:
        return fn(names[0], grouped)
    parts = index.split(grouped)
    return torch.cat([fn(name, part) for name, part in zip(names, parts)]
                     + [fn(names[0], part) for part in parts[len(names):]])


class ModalityLinear(MegatronModule):
    """y = x W_m^T for the rows of each modality m, W_m tensor-parallel like Megatron's linears.

    `parallel="column"` splits the output features over TP ranks (weight [out / tp, in]),
    `parallel="row"` the input features ([out, in / tp]). Communication is the caller's: the
    MoT sublayers gather the sequence once and reduce once for all modalities.

    Each W_m is initialised as megatron-core initialises its TP linears: with
    `use_cpu_initialization`, this rank's slice of a master weight drawn whole (the gathered
    shards equal the world-size-1 weight of the same seed); otherwise on the device, from the
    model-parallel RNG tracker (a different stream on each TP rank).
    """

    def __init__(self, config, input_size: int, output_size: int, parallel: str, untied: bool,
                 init_method):
        super().__init__(config)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if parallel == "column":
            shape, self.tp_axis = (output_size // tp, input_size), 0
        elif parallel == "row":
            shape, self.tp_axis = (output_size, input_size // tp), 1
        else:
            raise ValueError(f"parallel must be 'column' or 'row', got {parallel!r}")
        self.names = group_names(config, untied)
        self.weight = torch.nn.ParameterDict()
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        for name in self.names:
            weight = torch.nn.Parameter(torch.empty(shape, dtype=config.params_dtype, device=device))
            if not config.perform_initialization:
                set_tensor_model_parallel_attributes(weight, True, self.tp_axis, stride=1)
            elif config.use_cpu_initialization:
                _initialize_affine_weight_cpu(weight, output_size, input_size, shape[self.tp_axis],
                                              self.tp_axis, init_method,
                                              params_dtype=config.params_dtype)
            else:
                _initialize_affine_weight_gpu(weight, init_method, partition_dim=self.tp_axis)
            self.weight[name] = weight

    def project(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """rows [n, in (local)] of weight set `name` (a modality, or `shared`) -> [n, out (local)]."""
        return F.linear(rows, self.weight[name])

    def forward(self, rows: torch.Tensor, index: ModalityIndex) -> torch.Tensor:
        """rows [n, in (local)] in token order -> [n, out (local)] in token order."""
        return apply_per_modality(self.project, rows, index, self.names)

    def forward_grouped(self, grouped: torch.Tensor, index: ModalityIndex) -> torch.Tensor:
        """rows [n, in (local)] grouped by modality (`index.group`) -> [n, out (local)], grouped."""
        return apply_grouped(self.project, grouped, index, self.names)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state_dict, prefix, {key: self.tp_axis for key in state_dict}, sharded_offsets
        )


class ModalityNorm(MegatronModule, ModalityAware):
    """RMSNorm or LayerNorm (per `config.normalization`) with per-modality weights.

    Built by Megatron's TransformerLayer in its norm slots as (config, hidden_size, eps); there
    it normalises this rank's tokens, so it reads the index of this rank's sequence chunk.
    Weights are replicated over TP; under sequence parallelism each rank sees its own chunk, so
    they are marked `sequence_parallel` for megatron-core to sum their gradients over TP.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, untied: bool = None):
        super().__init__(config)
        if untied is None:
            untied = config.mot.is_untied("norms")
        self.names = group_names(config, untied)
        self.eps = eps
        self.rms = config.normalization == "RMSNorm"
        self.weight = torch.nn.ParameterDict()
        self.bias = torch.nn.ParameterDict()
        for name in self.names:
            self.weight[name] = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
            if not self.rms:
                self.bias[name] = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel

    def normalize(self, rows: torch.Tensor, index: ModalityIndex) -> torch.Tensor:
        """rows [n, ..., hidden] in the token order of `index` -> same shape."""
        return apply_per_modality(self._norm, rows, index, self.names)

    def normalize_grouped(self, grouped: torch.Tensor, index: ModalityIndex) -> torch.Tensor:
        """rows [n, ..., hidden] grouped by modality (`index.group`) -> same shape, grouped."""
        return apply_grouped(self._norm, grouped, index, self.names)

    def _norm(self, name, x):
        shape = x.shape[-1:]
        if self.rms:
            return F.rms_norm(x, shape, self.weight[name], self.eps)
        return F.layer_norm(x, shape, self.weight[name], self.bias[name], self.eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [s (local), b, h] in a TransformerLayer norm slot."""
        index = local_modality_index(self)
        rows = hidden_states.reshape(-1, hidden_states.shape[-1])
        return self.normalize(rows, index).view_as(hidden_states)


def local_modality_index(module) -> ModalityIndex:
    """Index of the tokens this rank holds: its sequence chunk under sequence parallelism."""
    index = module.modality_index()
    if not module.config.sequence_parallel:
        return index
    tp = parallel_state.get_tensor_model_parallel_world_size()
    return index.chunk(parallel_state.get_tensor_model_parallel_rank(), tp)
