"""Routers of a MoMa modality group (docs/layers.md §§2, 3).

Router weights are replicated across tensor-parallel ranks, like Megatron's MoE router. Under
sequence parallelism each rank sees only its chunk of the tokens, so their gradients are marked
`sequence_parallel` and megatron-core's `finalize_model_grads` sums them over the TP group.
"""

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, get_cuda_rng_tracker
from megatron.core.transformer.module import MegatronModule


def _replicated_parameter(config, shape) -> torch.nn.Parameter:
    weight = torch.nn.Parameter(torch.empty(shape, dtype=config.params_dtype))
    config.init_method(weight)
    weight.sequence_parallel = config.sequence_parallel
    return weight


class ExpertChoiceRouter(MegatronModule):
    """Per-expert affinity of each token: s = sigmoid(x W^T), no softmax across experts.

    With `gumbel_noise`, training scores are sigmoid(x W^T + g1 - g2), g1 and g2 iid Gumbel(0, 1).
    `sum_grad_over_tp`: the TP ranks each use the scores of a different share of the tokens
    (MoMa under tensor parallelism without SP), so W's gradient is summed over the TP group.
    """

    def __init__(self, config, num_experts: int, gumbel_noise: bool = False,
                 sum_grad_over_tp: bool = False):
        super().__init__(config)
        self.weight = _replicated_parameter(config, (num_experts, config.hidden_size))
        self.gumbel_noise = gumbel_noise
        self.sum_grad_over_tp = sum_grad_over_tp

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [n, h] -> scores [n, num_experts] in (0, 1)."""
        weight = self.weight
        if self.sum_grad_over_tp:
            weight = copy_to_tensor_model_parallel_region(weight)  # backward: all-reduce
        logits = F.linear(tokens, weight)
        if self.gumbel_noise and self.training:
            uniform = self._uniform_noise((2,) + logits.shape, logits)
            gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0)))
            logits = logits + gumbel[0] - gumbel[1]
        return torch.sigmoid(logits)

    def _uniform_noise(self, shape, like: torch.Tensor) -> torch.Tensor:
        """U(0, 1) of `shape`. Under sequence parallelism each TP rank scores its own tokens, so
        it draws from its own stream (megatron-core's model-parallel RNG tracker, as its dropout
        in SP regions does); otherwise the TP ranks score the same tokens and draw the same."""
        if self.config.sequence_parallel and parallel_state.get_tensor_model_parallel_world_size() > 1:
            with get_cuda_rng_tracker().fork():
                return torch.rand(shape, dtype=like.dtype, device=like.device)
        return torch.rand(shape, dtype=like.dtype, device=like.device)

    def adds_noise(self) -> bool:
        """Whether `forward` now adds Gumbel noise (training with `gumbel_noise`)."""
        return self.gumbel_noise and self.training

    @torch.no_grad()
    def noise_free_scores(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [n, h] -> sigmoid(x W^T) [n, num_experts] without noise, detached: the scores
        the auxiliary routers learn to imitate (inference sees no noise)."""
        return torch.sigmoid(F.linear(tokens, self.weight))


class AuxiliaryRouter(MegatronModule):
    """Causal stand-in for expert choice: a(x) = sigmoid(silu(x W1) W2), d -> d/2 -> outputs.

    Trained with binary cross-entropy against the expert-choice assignment; at inference a token
    goes to expert j iff a_j(x) > 0.5.
    """

    def __init__(self, config, num_outputs: int):
        super().__init__(config)
        hidden = config.hidden_size // 2
        self.linear_in = _replicated_parameter(config, (hidden, config.hidden_size))
        self.linear_out = _replicated_parameter(config, (num_outputs, hidden))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [n, h] -> probabilities [n, num_outputs]."""
        return torch.sigmoid(F.linear(F.silu(F.linear(tokens, self.linear_in)), self.linear_out))
