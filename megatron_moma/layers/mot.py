"""Mixture-of-Transformers sublayers (docs/layers.md §§6, 7).

For each modality m, with I_m the rows of m:

    Q_m, K_m, V_m = x[I_m] W_q^m, x[I_m] W_k^m, x[I_m] W_v^m
    A = causal self-attention of (Q, K, V) in sequence order: global, across modalities
    O_m = A[I_m] W_o^m;   h = x + norm_attn^m(O_m)  (post-norm)  or  x + O_m  (pre-norm input)
    y_m = h_m + norm_ffn^m(FFN_m(h_m))  with FFN_m = SwiGLU with W_gate^m, W_up^m, W_down^m

Tensor parallelism splits heads and FFN columns as Megatron does. Each sublayer enters the
tensor-parallel region once (all-gather of the sequence under SP, identity otherwise), runs every
modality's projection on its rows, and leaves it once (reduce-scatter under SP, all-reduce
otherwise): the per-modality split adds row gathers, never collectives. Rows are grouped by
modality once per step that needs it: once for Q, K and V together, once for the output
projection, once for the whole FFN (gate, up and down run on each modality's contiguous block).
"""

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_moma.layers.modality_weights import ModalityLinear, ModalityNorm, apply_per_modality
from megatron_moma.modality.context import ModalityAware


def enter_tensor_parallel_region(config, hidden_states: torch.Tensor) -> torch.Tensor:
    """[s (local), b, h] -> [s, b, h] replicated on the TP ranks."""
    if config.sequence_parallel:
        return gather_from_sequence_parallel_region(hidden_states)
    return copy_to_tensor_model_parallel_region(hidden_states)


def leave_tensor_parallel_region(config, partial_sums: torch.Tensor) -> torch.Tensor:
    """Partial sums [s, b, h] of the TP ranks -> their sum, [s (local), b, h]."""
    if config.sequence_parallel:
        return reduce_scatter_to_sequence_parallel_region(partial_sums)
    return reduce_from_tensor_model_parallel_region(partial_sums)


class _PostNorm(MegatronModule, ModalityAware):
    """Base of sublayers that may end in Chameleon's post-norm: output = norm(sublayer(x))."""

    def _maybe_post_norm(self, output: torch.Tensor) -> torch.Tensor:
        if self.post_norm is None:
            return output
        return self.post_norm(output)


@dataclass
class MoTSelfAttentionSubmodules:
    core_attention: Union[ModuleSpec, type] = None


class MoTSelfAttention(_PostNorm):
    """Per-modality Q, K, V and output projections around one global causal core attention.

    Input and output [s, b, h] (s local under SP). Per-modality QK-norm over the head dimension
    when `mot.qk_layernorm`.
    """

    def __init__(self, config, submodules: MoTSelfAttentionSubmodules, layer_number: int,
                 attn_mask_type=AttnMaskType.causal, pg_collection=None, **kwargs):
        super().__init__(config)
        untied = config.mot.is_untied("attention")
        tp = parallel_state.get_tensor_model_parallel_world_size()
        head_dim = config.kv_channels
        self.heads_per_rank = config.num_attention_heads // tp
        self.groups_per_rank = config.num_query_groups // tp
        self.head_dim = head_dim
        q_size = config.num_attention_heads * head_dim
        kv_size = config.num_query_groups * head_dim
        h = config.hidden_size
        self.linear_q = ModalityLinear(config, h, q_size, "column", untied, config.init_method)
        self.linear_k = ModalityLinear(config, h, kv_size, "column", untied, config.init_method)
        self.linear_v = ModalityLinear(config, h, kv_size, "column", untied, config.init_method)
        self.linear_proj = ModalityLinear(config, q_size, h, "row", untied,
                                          config.output_layer_init_method)
        self.q_layernorm = self.k_layernorm = None
        if config.mot.qk_layernorm:
            self.q_layernorm = ModalityNorm(config, head_dim, config.layernorm_epsilon, untied)
            self.k_layernorm = ModalityNorm(config, head_dim, config.layernorm_epsilon, untied)
            for norm in (self.q_layernorm, self.k_layernorm):
                for param in norm.parameters():
                    # Each TP rank normalises its own heads of the whole sequence: megatron-core
                    # sums the grads of parameters named q_layernorm/k_layernorm over TP when
                    # config.qk_layernorm is set (ModalityTransformerConfig sets it for MoT).
                    param.sequence_parallel = False
        self.core_attention = build_module(
            submodules.core_attention, config=config, layer_number=layer_number,
            attn_mask_type=attn_mask_type, attention_type="self", pg_collection=pg_collection,
        )
        self.post_norm = None
        if config.mot.norm_placement == "post":
            self.post_norm = ModalityNorm(config, h, config.layernorm_epsilon)

    def forward(self, hidden_states, attention_mask=None, rotary_pos_emb=None,
                packed_seq_params=None, **unused):
        """hidden_states [s, b, h] -> (output [s, b, h], None)."""
        if packed_seq_params is not None:
            raise NotImplementedError("MoTSelfAttention does not support packed sequences")
        index = self.modality_index()
        full = enter_tensor_parallel_region(self.config, hidden_states)
        s, b, h = full.shape
        q, k, v = self._project_qkv(full.reshape(s * b, h), index)
        q, k, v = (t.view(s, b, t.shape[1], self.head_dim) for t in (q, k, v))
        if rotary_pos_emb is not None:
            q_emb, k_emb = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
            q = apply_rotary_pos_emb(q, q_emb, config=self.config)
            k = apply_rotary_pos_emb(k, k_emb, config=self.config)
        context = self.core_attention(q, k, v, attention_mask, attn_mask_type=AttnMaskType.causal)
        projected = self.linear_proj(context.reshape(s * b, -1), index)
        output = leave_tensor_parallel_region(self.config, projected.view(s, b, h))
        return self._maybe_post_norm(output), None

    def _project_qkv(self, rows: torch.Tensor, index):
        """rows [n, h] in token order -> q [n, heads, head_dim], k and v [n, groups, head_dim]
        in token order (q and k QK-normed when configured). Untied, the rows are grouped by
        modality once for the three projections and the QK-norms."""
        untied = len(self.linear_q.names) > 1
        x = index.group(rows) if untied else rows
        q = self.linear_q.forward_grouped(x, index).view(-1, self.heads_per_rank, self.head_dim)
        k = self.linear_k.forward_grouped(x, index).view(-1, self.groups_per_rank, self.head_dim)
        v = self.linear_v.forward_grouped(x, index).view(-1, self.groups_per_rank, self.head_dim)
        if self.q_layernorm is not None:
            q = self.q_layernorm.normalize_grouped(q, index)
            k = self.k_layernorm.normalize_grouped(k, index)
        return [index.ungroup(t) for t in (q, k, v)] if untied else [q, k, v]


class MoTMLP(_PostNorm):
    """Per-modality SwiGLU FFN: W_down^m (silu(x W_gate^m) * x W_up^m). [s, b, h] -> [s, b, h]."""

    def __init__(self, config, submodules=None, untied: Optional[bool] = None, **kwargs):
        super().__init__(config)
        untied = config.mot.is_untied("ffn") if untied is None else untied
        h, ffn = config.hidden_size, config.ffn_hidden_size
        self.linear_gate = ModalityLinear(config, h, ffn, "column", untied, config.init_method)
        self.linear_up = ModalityLinear(config, h, ffn, "column", untied, config.init_method)
        self.linear_down = ModalityLinear(config, ffn, h, "row", untied,
                                          config.output_layer_init_method)
        self.post_norm = None
        if config.mot.norm_placement == "post":
            self.post_norm = ModalityNorm(config, h, config.layernorm_epsilon)

    def forward(self, hidden_states, padding_mask=None):
        """hidden_states [s, b, h] -> (output [s, b, h], None)."""
        index = self.modality_index()
        full = enter_tensor_parallel_region(self.config, hidden_states)
        s, b, h = full.shape
        projected = apply_per_modality(self._ffn, full.reshape(s * b, h), index,
                                       self.linear_gate.names)
        output = leave_tensor_parallel_region(self.config, projected.view(s, b, h))
        return self._maybe_post_norm(output), None

    def _ffn(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """rows [n, h] of weight set `name` -> [n, h]: the whole SwiGLU on one modality's rows."""
        gate = self.linear_gate.project(name, rows)
        return self.linear_down.project(name, F.silu(gate) * self.linear_up.project(name, rows))
