"""Mixture-of-Depths: a transformer layer that only some tokens go through (docs/layers.md §4).

On a MoD layer, a router ahead of the modality split scores every token, r(x) = sigmoid(x w).
The top k = ceil(c_d * n) of the scope's n tokens by r go through the whole layer (attention
among the chosen tokens of their sequence, in their original order and positions, and the MLP);
the others skip it:

    y = x + r(x) * (Layer(x) - x)   for the k chosen tokens,   y = x   for the rest,

so the router gets gradient through the scaled update. The scope (`topk_scope`) is the micro-
batch (the MoMa paper's choice, the default: n = s * b, sequences keep different numbers of
tokens) or each sequence (the MoD paper's: n = s). The chosen tokens run as a [k_max, b] batch:
under the batch scope each sequence's chosen tokens are followed by padding (its first unchosen
positions) up to the longest; causal attention keeps padding out of the chosen tokens' view, the
MoMa experts route none of it, and its outputs are dropped. Inside, the layer's modality-aware
sublayers see the modality index of the chosen tokens (padding rows: `ModalityIndex`'s padding).

Under sequence parallelism the layer gathers the sequence, chooses on the whole of it (every TP
rank computes the same choice), hands the inner layer its chunk of the chosen tokens, and scatters
the result back: the routing is identical in every layout.

Eval mode with `inference_routing="aux"` routes causally: a token goes through iff its auxiliary
router a(x) = sigmoid(silu(x W1) W2) says > 0.5, sequence by sequence. The auxiliary router learns
the top-k choice by binary cross-entropy on detached inputs during training.
"""

import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_moma.layers.routers import AuxiliaryRouter
from megatron_moma.layers.routing_statistics import ROUTING_STATISTICS
from megatron_moma.modality.context import ModalityAware
from megatron_moma.modality.index import ModalityIndex


class MoDTransformerLayer(TransformerLayer, ModalityAware):
    """A TransformerLayer (same spec, same parameter names) that routes tokens around itself on
    the layers `config.mod` names, plus `mod_router.weight` [1, h] and `mod_aux_router.*` there.
    Input and output [s, b, h] (s local under SP)."""

    def __init__(self, config, submodules, layer_number: int = 1, **kwargs):
        super().__init__(config, submodules, layer_number=layer_number, **kwargs)
        self.options = config.mod
        self.routes_tokens = self.options.routes_layer(self.layer_number - 1)
        self.mod_router = self.mod_aux_router = None
        if self.routes_tokens:
            self.mod_router = torch.nn.Linear(config.hidden_size, 1, bias=False,
                                              dtype=config.params_dtype)
            config.init_method(self.mod_router.weight)
            if self.options.aux_router:
                self.mod_aux_router = AuxiliaryRouter(config, 1)
                for param in self.mod_aux_router.parameters():
                    param.sequence_parallel = False  # it sees the whole gathered sequence

    def forward(self, hidden_states, attention_mask=None, rotary_pos_emb=None, **kwargs):
        if not self.routes_tokens:
            return super().forward(hidden_states=hidden_states, attention_mask=attention_mask,
                                   rotary_pos_emb=rotary_pos_emb, **kwargs)
        if attention_mask is not None:
            raise NotImplementedError("MoD layers build their own causal mask; got attention_mask")
        full = self._gather_sequence(hidden_states)  # [s, b, h], the same on every TP rank
        scores = torch.sigmoid(self.mod_router(full)).squeeze(-1)  # [s, b]
        causal = not self.training and self.options.inference_routing == "aux"
        if causal:
            output = self._route_by_aux_router(full, scores, rotary_pos_emb, kwargs)
        else:
            chosen, valid = self._top_k(scores.detach())
            output = self._through_layer(full, scores, chosen, rotary_pos_emb, kwargs, valid)
            if self.training and self._records_statistics():
                taken = torch.as_tensor(chosen.numel() if valid is None else valid.sum())
                ROUTING_STATISTICS.add(f"mod/layer{self.layer_number:03d}/selection",
                                       torch.stack([taken.cpu(), torch.tensor(scores.numel())]))
            if self.training and self.mod_aux_router is not None:
                output = MoEAuxLossAutoScaler.apply(output, self._aux_router_loss(full, chosen, valid))
        return self._scatter_sequence(output), None

    def _top_k(self, scores: torch.Tensor):
        """[s, b] scores -> (chosen [k, b] positions, increasing in each sequence; valid [k, b]
        bool, None when every chosen position is a choice). Ties: the earlier token first (in
        the batch scope, the earlier row of the [s, b] order)."""
        s, b = scores.shape
        tp = self._sequence_parallel_size()
        if self.options.topk_scope == "sequence":
            k = math.ceil(self.options.capacity * s)
            if k % tp:
                raise ValueError(f"MoD chooses {k} of {s} tokens per sequence, which does not "
                                 f"split over {tp} sequence-parallel ranks; adjust the capacity")
            order = torch.sort(scores, dim=0, descending=True, stable=True).indices
            return torch.sort(order[:k], dim=0).values, None
        total = math.ceil(self.options.capacity * s * b)
        order = torch.sort(scores.reshape(-1), descending=True, stable=True).indices
        taken = torch.zeros(s * b, dtype=torch.bool, device=scores.device)
        taken[order[:total]] = True
        taken = taken.view(s, b)
        counts = taken.sum(0)  # [b]
        k = -(-int(counts.max()) // tp) * tp  # the longest, split evenly over the SP ranks
        positions = torch.arange(s, device=scores.device).unsqueeze(1).expand(s, b)
        chosen_first = torch.where(taken, positions, positions + s)  # then the unchosen
        chosen = torch.sort(chosen_first, dim=0).values[:k] % s
        valid = torch.arange(k, device=scores.device).unsqueeze(1) < counts.unsqueeze(0)
        return chosen, valid

    def _through_layer(self, full, scores, chosen, rotary_pos_emb, kwargs, valid=None):
        """Run the tokens at `chosen` [k, b] through the layer; return the updated [s, b, h]
        (positions not `valid` [k, b], the padding, keep their input)."""
        k, b = chosen.shape
        h = full.shape[-1]
        where = chosen.unsqueeze(-1).expand(k, b, h)
        tokens = full.gather(0, where)  # [k, b, h]
        outer_index = self.modality_index()
        modality_ids = outer_index.modality_ids.view(-1, b).gather(0, chosen)
        if valid is not None:  # padding rows belong to no modality
            modality_ids = modality_ids.masked_fill(~valid, outer_index.num_modalities)
        self.modality_context.index = ModalityIndex(modality_ids.reshape(-1), outer_index.num_modalities)
        try:
            processed, _ = super().forward(
                hidden_states=self._scatter_sequence(tokens),
                attention_mask=None,
                rotary_pos_emb=_positions_of(rotary_pos_emb, chosen),
                **kwargs,
            )
        finally:
            self.modality_context.index = outer_index
        processed = self._gather_sequence(processed)
        weight = scores.gather(0, chosen).unsqueeze(-1).to(tokens.dtype)
        updated = tokens + weight * (processed - tokens)
        if valid is not None:
            updated = torch.where(valid.unsqueeze(-1), updated, tokens)
        return full.scatter(0, where, updated)

    def _route_by_aux_router(self, full, scores, rotary_pos_emb, kwargs):
        if self._sequence_parallel_size() > 1:
            raise NotImplementedError("causal MoD inference does not support sequence parallelism")
        taken = self.mod_aux_router(full).squeeze(-1) > 0.5  # [s, b]
        outputs = []
        for i in range(full.shape[1]):
            chosen = taken[:, i].nonzero().view(-1, 1)  # [k_i, 1]
            sequence = full[:, i : i + 1]
            if chosen.numel():
                index = self.modality_index()
                one = ModalityIndex(index.modality_ids.view(-1, full.shape[1])[:, i],
                                    index.num_modalities)
                saved, self.modality_context.index = index, one
                try:
                    sequence = self._through_layer(
                        sequence, scores[:, i : i + 1], chosen, rotary_pos_emb, kwargs
                    )
                finally:
                    self.modality_context.index = saved
            outputs.append(sequence)
        return torch.cat(outputs, dim=1)

    def _aux_router_loss(self, full, chosen, valid=None) -> torch.Tensor:
        """Binary cross-entropy of the auxiliary router against the top-k choice, per token."""
        target = torch.zeros(full.shape[:2], dtype=full.dtype, device=full.device)
        if valid is None:
            target.scatter_(0, chosen, 1.0)
        else:
            target.scatter_(0, chosen, valid.to(full.dtype))
        predicted = self.mod_aux_router(full.detach()).squeeze(-1)
        if self._records_statistics():
            ROUTING_STATISTICS.add_aux_router_decisions(
                f"mod/layer{self.layer_number:03d}", predicted, target
            )
        return self.options.aux_loss_coeff * F.binary_cross_entropy(predicted, target)

    def _records_statistics(self) -> bool:
        """The TP ranks choose on the same gathered sequence: one of them records."""
        return parallel_state.get_tensor_model_parallel_rank() == 0

    def _sequence_parallel_size(self) -> int:
        if not self.config.sequence_parallel:
            return 1
        return parallel_state.get_tensor_model_parallel_world_size()

    def _gather_sequence(self, hidden_states):
        """[s / tp, b, h] -> [s, b, h]; the gradient of the copy each rank holds is its own."""
        if self._sequence_parallel_size() == 1:
            return hidden_states
        return gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)

    def _scatter_sequence(self, hidden_states):
        if self._sequence_parallel_size() == 1:
            return hidden_states
        return scatter_to_sequence_parallel_region(hidden_states)


def _positions_of(rotary_pos_emb, chosen: torch.Tensor):
    """Rotary frequencies [s, 1, 1, d] -> those of the chosen tokens [k, b, 1, d]."""
    if rotary_pos_emb is None:
        return None
    if isinstance(rotary_pos_emb, tuple):
        return tuple(_positions_of(r, chosen) for r in rotary_pos_emb)
    return rotary_pos_emb[chosen].squeeze(2)
