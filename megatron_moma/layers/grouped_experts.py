"""A group of expert MLPs run as grouped GEMMs on torch's grouped matmuls, bf16 or FP8.

`GroupedExpertMLP` holds its weights exactly as megatron-core's SequentialMLP does (it is one:
`local_experts.{j}.linear_fc{1,2}.weight`, the same sharded_state_dict mapping local to global
expert indices), so checkpoints move freely between the two; only the forward differs. For the
rows of each expert j (consecutive blocks, `tokens_per_expert[j]` rows each):

    h = act(x W1_j^T)   (SwiGLU: silu(x W_gate^T) * x W_up^T, W1_j = [W_gate; W_up])
    y = (probs * h) W2_j^T

Each of the two products is one grouped GEMM over all local experts:
- without FP8, `torch._grouped_mm` in the weights' dtype (torch's CUTLASS kernel on Hopper,
  a per-group loop elsewhere, CPU included);
- with `ExpertFp8Options`, forward and input gradient in FP8 (`megatron_moma.layers.fp8`): the
  activations, weights and output gradients are quantized with current scaling, the output
  gradient in E5M2 under the `hybrid` format, E4M3 under `e4m3`. The weight gradient stays in
  the weights' dtype (bf16): it reads the saved bf16 input, not an FP8 copy. Before the GEMMs each
  expert's rows are padded to a multiple of 16 (`expert_padding`), after them the padding goes.

This is the local (no Transformer Engine) grouped-GEMM path of MoMa experts, chosen by
`moe_grouped_gemm` (Megatron-LM's `--moe-grouped-gemm`) or by `expert_fp8`; with Transformer
Engine MoMa uses megatron-core's TEGroupedMLP instead.
"""

from typing import Optional, Sequence

import torch
from megatron.core.transformer.moe.experts import SequentialMLP

from megatron_moma.config.fp8 import ExpertFp8Options
from megatron_moma.layers import fp8
from megatron_moma.layers.expert_padding import ExpertPadding

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _group_offsets(counts: Sequence[int], device) -> torch.Tensor:
    """int32 end row of each group, as torch._grouped_mm takes them."""
    return torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)


class GroupedLinear(torch.autograd.Function):
    """y[R_e] = x[R_e] W_e^T for consecutive row blocks R_e: x [M, K], W_e [N, K] -> y [M, N].

    apply(x, counts, fp8_options or None, W_0, ..., W_{E-1}); each W_e gets its own gradient.
    """

    @staticmethod
    def forward(ctx, x, counts, options: Optional[ExpertFp8Options], *weights):
        ctx.counts, ctx.options = list(counts), options
        ctx.save_for_backward(x, *weights)
        stacked = torch.stack(weights)  # [E, N, K]
        if options is None:
            offsets = _group_offsets(counts, x.device)
            return torch._grouped_mm(x, stacked.transpose(1, 2), offs=offsets)
        if x.shape[0] == 0:
            return x.new_zeros(0, stacked.shape[1])
        rowwise = options.recipe == "rowwise"
        x_q, x_scale = fp8.quantize(x, E4M3, rowwise)
        w_q, w_scale = fp8.quantize(stacked, E4M3, rowwise)
        return fp8.scaled_grouped_matmul(x_q, x_scale, w_q, w_scale, counts, rowwise, x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        x, *weights = ctx.saved_tensors
        grad_output = grad_output.contiguous()
        offsets = _group_offsets(ctx.counts, x.device)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = GroupedLinear._input_grad(grad_output, torch.stack(weights), ctx.counts,
                                               offsets, ctx.options)
        grad_weights = [None] * len(weights)
        if any(ctx.needs_input_grad[3:]):
            # [E, N, K] -> E gradients [N, K]
            grad_weights = torch._grouped_mm(grad_output.t(), x, offs=offsets).unbind(0)
        return (grad_x, None, None, *grad_weights)

    @staticmethod
    def _input_grad(grad_output, stacked, counts, offsets, options):
        """dx[R_e] = dy[R_e] W_e: dy [M, N], stacked [E, N, K] -> [M, K]."""
        if options is None:
            return torch._grouped_mm(grad_output, stacked, offs=offsets)
        if grad_output.shape[0] == 0:
            return grad_output.new_zeros(0, stacked.shape[2])
        rowwise = options.recipe == "rowwise"
        grad_dtype = E5M2 if options.format == "hybrid" else E4M3
        grad_q, grad_scale = fp8.quantize(grad_output, grad_dtype, rowwise)
        # dy W_e = dy (W_e^T)^T: W_e^T [K, N] quantized per row of it, i.e. per input channel.
        w_q, w_scale = fp8.quantize(stacked.transpose(1, 2).contiguous(), E4M3, rowwise)
        return fp8.scaled_grouped_matmul(grad_q, grad_scale, w_q, w_scale, counts, rowwise,
                                         grad_output.dtype)


class GroupedExpertMLP(SequentialMLP):
    """SequentialMLP's experts and checkpoint layout, run as grouped GEMMs (bf16 or FP8).

    forward(rows [M, h] by expert, tokens_per_expert [E] int64, probs [M]) -> ([M, h], None).
    `fp8_options`: FP8 GEMMs with these options (torch's scaled matmuls), None for GEMMs in the
    weights' dtype.
    """

    def __init__(self, num_local_experts, config, submodules, pg_collection=None,
                 fp8_options: Optional[ExpertFp8Options] = None):
        _check_supported(config, fp8_options)
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        self.fp8_options = fp8_options

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        rows, probs = permuted_local_hidden_states, permuted_probs.unsqueeze(-1)
        counts = tokens_per_expert.tolist()
        padding = None
        if self.fp8_options is not None:
            padding = ExpertPadding.plan(counts, fp8.FP8_ROW_ALIGNMENT, rows.device)
            rows, probs, counts = padding.pad(rows), padding.pad(probs), padding.counts
        fc1 = GroupedLinear.apply(rows, counts, self.fp8_options,
                                  *[expert.linear_fc1.weight for expert in self.local_experts])
        if self.config.gated_linear_unit:
            gate, up = torch.chunk(fc1, 2, dim=-1)
            hidden = self.config.activation_func(gate) * up
        else:
            hidden = self.config.activation_func(fc1)
        hidden = (hidden * probs).to(fc1.dtype)
        output = GroupedLinear.apply(hidden, counts, self.fp8_options,
                                     *[expert.linear_fc2.weight for expert in self.local_experts])
        if padding is not None:
            output = padding.unpad(output)
        return output, None


def _check_supported(config, fp8_options: Optional[ExpertFp8Options]) -> None:
    """Refuse the SequentialMLP options this forward does not implement, naming them."""
    unsupported = {
        "add_bias_linear": config.add_bias_linear,
        "moe_apply_probs_on_input": config.moe_apply_probs_on_input,
        "use_te_activation_func": config.use_te_activation_func,
        "activation_func_clamp_value": config.activation_func_clamp_value is not None,
        "glu_linear_offset": config.glu_linear_offset != 0.0,
    }
    named = [name for name, value in unsupported.items() if value]
    if named:
        raise ValueError(f"GroupedExpertMLP (grouped GEMM experts without Transformer Engine) "
                         f"does not support {named}; use SequentialMLP experts "
                         f"(moe_grouped_gemm=False, no expert_fp8)")
    missing = fp8.missing_torch_ops(fp8.TORCH_FP8_OPS if fp8_options else ("_grouped_mm",))
    if missing:
        raise ValueError(f"grouped expert GEMMs need torch's {missing}, which torch "
                         f"{torch.__version__} lacks (torch >= 2.8 has them)")
    if fp8_options is not None:
        ffn = config.moe_ffn_hidden_size or config.ffn_hidden_size
        if config.hidden_size % 16 or ffn % 16:
            raise ValueError(f"FP8 expert GEMMs need hidden_size ({config.hidden_size}) and the "
                             f"expert FFN size ({ffn}) divisible by 16")
