"""MoMa: the modality-aware mixture-of-experts MLP (docs/layers.md §§2, 3).

Replaces the MLP of a Megatron TransformerLayer. For each modality M, with its expert group E_M:

    s = sigmoid(x W_M^T)                          scores [n_M, |E_M|] of the modality's tokens
    expert j takes the top k_e tokens by s_j,     k_e = ceil(capacity_factor * n_M / |E_M|)
    y(x) = sum over experts j that took x of s_j(x) * FFN_j(x)      (0 if no expert took x)

A token only ever reaches experts of its own modality's group. A group of one expert has no
router: every token of its modality goes to that expert with weight 1 (MoMa 1t1i is pure
modality untying, "no learned routing"). The routing scope is the
micro-batch on this data-parallel rank: under sequence parallelism the scores of the whole
sequence are gathered across the tensor-parallel group for the selection (no gradient flows
through the selection), so the choice is the same whatever the layout. Under tensor parallelism
without SP every TP rank routes all tokens and runs the experts on its share of the chosen rows.
Selected rows go to their experts through `dispatch.expert_parallel`: over the expert-parallel
group to the experts' owners, and with expert tensor parallelism (megatron-core's
`expert_tensor_parallel_size` > 1: linear_fc1 column-parallel, linear_fc2 row-parallel over the
expert-TP group) gathered over that group before the experts and reduce-scattered after them,
as megatron-core's all-to-all token dispatcher does.

With `routing="token_choice"` each group instead has Megatron's TopKRouter over its experts
(its score function, top-k, load-balancing loss and expert bias, configured by the usual
`moe_router_*` fields; `token_choice_topk` is the k): causal, so it needs no auxiliary router.

In eval mode with `inference_routing="aux"`, a token goes to expert j iff a_j(x) > 0.5, a the
auxiliary router; the weight is still s_j(x). In training the auxiliary routers learn the
expert-choice assignment of the noise-free scores (the one inference would make; with Gumbel
noise the layer itself routes by the noisy scores) by binary cross-entropy on detached inputs
(so the loss trains the auxiliary routers only), attached to the output with Megatron's
MoEAuxLossAutoScaler.
"""

import copy
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, get_default_pg_collection
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import sharded_state_dict_default

from megatron_moma.dispatch import expert_parallel
from megatron_moma.layers.routers import AuxiliaryRouter, ExpertChoiceRouter
from megatron_moma.layers.routing_statistics import ROUTING_STATISTICS
from megatron_moma.modality.context import ModalityAware


@dataclass
class GroupSelection:
    """Which of a group's local rows go to which expert, and with what weight (sorted by expert).

    rows: [R] int64 positions in the group's local rows; expert: [R] int64; weight: [R] s_j(x).
    """

    rows: torch.Tensor
    expert: torch.Tensor
    weight: torch.Tensor


def _every_row(rows: torch.Tensor) -> GroupSelection:
    """All rows to the group's single expert, weight 1."""
    positions = torch.arange(rows.numel(), device=rows.device)
    return GroupSelection(positions, torch.zeros_like(positions),
                          torch.ones(rows.numel(), device=rows.device))


@dataclass
class MoMaSubmodules:
    """The spec of a group's experts: a megatron-core expert module (SequentialMLP,
    TEGroupedMLP) with its submodules; built with (num_local_experts, config, pg_collection)."""

    experts: ModuleSpec


class MoMaMLP(MegatronModule, ModalityAware):
    """Modality-grouped expert-choice MoE. Input and output [s, b, h] (s local under SP)."""

    def __init__(self, config, submodules: MoMaSubmodules, layer_number: Optional[int] = None,
                 pg_collection=None):
        super().__init__(config)
        self.layer_number = layer_number
        self.options = config.moma
        self.group_names = config.modality_layout.names
        pg_collection = pg_collection or get_default_pg_collection()
        self.tp_group = pg_collection.tp
        self.ep_group = pg_collection.ep
        self.expert_tp_group = pg_collection.expt_tp
        if config.expert_tensor_parallel_size != self.expert_tp_group.size():
            raise ValueError(
                f"MoMa: config.expert_tensor_parallel_size is {config.expert_tensor_parallel_size} "
                f"but megatron-core's expert-tensor-parallel group has {self.expert_tp_group.size()} "
                "ranks; initialise parallel_state with the same expert_tensor_parallel_size"
            )
        # Tensor parallelism without SP: every TP rank holds all tokens and routes them all (the
        # same choice everywhere); each runs the experts on its share of the chosen rows, and the
        # outputs are summed over TP.
        self.split_rows_over_tp = self.tp_group.size() > 1 and not config.sequence_parallel
        ep_size = self.ep_group.size()
        sizes = self.options.experts_per_modality
        routed = [(name, experts) for name, experts in zip(self.group_names, sizes) if experts > 1]
        self.expert_choice = self.options.routing == "expert_choice"
        self.routers = torch.nn.ModuleDict({
            name: self._build_router(config, experts, pg_collection) for name, experts in routed
        })
        self.experts = torch.nn.ModuleDict({
            name: build_module(submodules.experts, experts // ep_size, config,
                               pg_collection=pg_collection)
            for name, experts in zip(self.group_names, sizes)
        })
        # With expert-TP 1 every TP rank holds whole experts and runs them on its own rows, so
        # the TP peers are expert-data-parallel replicas; with expert-TP > 1 the expert-TP peers
        # hold slices of every expert and run them on the rows of the whole group. Megatron
        # treats expert weights as expert parameters (gradients reduced over the expert-data-
        # parallel group, norms over the expert-model-parallel group) only when EP > 1; MoMa's
        # are expert parameters at every EP size.
        for param in self.experts.parameters():
            param.allreduce = False
        self.aux_routers = torch.nn.ModuleDict({
            name: AuxiliaryRouter(config, experts) for name, experts in routed
        }) if self.expert_choice and self.options.aux_router and routed else None

    def forward(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """hidden_states [s, b, h] -> (output [s, b, h], None)."""
        if padding_mask is not None:
            raise NotImplementedError("MoMaMLP routes every token; padding masks are not supported")
        tp_size = self.tp_group.size() if self.config.sequence_parallel else 1
        full_index = self.modality_index()
        index = full_index.chunk(self.tp_group.rank() if tp_size > 1 else 0, tp_size)
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
        if self.split_rows_over_tp:
            tokens = copy_to_tensor_model_parallel_region(tokens)  # backward: sum the shares
        chunk_counts = full_index.chunk_counts(tp_size)

        # The routers' inputs: every modality's rows as one contiguous block, by a permutation
        # gather whose gradient is the inverse gather (`tokens[rows]` would scatter-add it).
        by_modality = index.split(index.group(tokens)) if len(self.routers) else None
        group_rows, selections, aux_losses = [], [], []
        for modality, name in enumerate(self.group_names):
            rows = index.rows(modality)
            group_rows.append(rows)
            if name not in self.routers:
                selections.append(_every_row(rows))
                continue
            group_tokens = by_modality[modality]
            if not self.expert_choice:
                selection = self._select_by_token_choice(name, group_tokens)
            else:
                scores = self.routers[name](group_tokens)
                counts = [c[modality] for c in chunk_counts]
                selection = self._select(name, group_tokens, scores, counts)
            selections.append(selection)
            if self.training and self._records_statistics():
                ROUTING_STATISTICS.add_expert_loads(
                    self.layer_number or 0, name, selection.expert,
                    self.options.experts_per_modality[modality], selection.rows, rows.numel(),
                )
            if self.training and self.expert_choice and self.aux_routers is not None:
                target = selection
                if self.routers[name].adds_noise():  # learn the noise-free top-k
                    target = self._select_by_expert_choice(
                        self.routers[name].noise_free_scores(group_tokens), counts)
                aux_losses.append(
                    self._aux_router_loss(name, group_tokens, target, scores.shape, sum(counts))
                )

        chosen = [expert_parallel.ExpertSelection(rows[s.rows], s.expert, s.weight)
                  for rows, s in zip(group_rows, selections)]
        if self.split_rows_over_tp:
            chosen = [self._tp_share(selection) for selection in chosen]
        output = expert_parallel.run_expert_groups(
            tokens,
            chosen,
            [self.experts[name] for name in self.group_names],
            self.options.experts_per_modality,
            self.ep_group,
            self.expert_tp_group,
        )
        if self.split_rows_over_tp:
            output = reduce_from_tensor_model_parallel_region(output)
        output = output.view_as(hidden_states)
        if aux_losses:
            loss = torch.stack(aux_losses).sum() * self.options.aux_loss_coeff
            output = MoEAuxLossAutoScaler.apply(output, loss)
        return output, None

    def _records_statistics(self) -> bool:
        """Every rank records its own tokens; without SP the TP ranks hold the same ones."""
        return not self.split_rows_over_tp or self.tp_group.rank() == 0

    def _tp_share(self, selection):
        """Every TP-size-th chosen row, from this TP rank's offset."""
        keep = slice(self.tp_group.rank(), None, self.tp_group.size())
        return expert_parallel.ExpertSelection(
            selection.token[keep], selection.expert[keep], selection.weight[keep]
        )

    def _build_router(self, config, num_experts: int, pg_collection):
        if self.expert_choice:
            return ExpertChoiceRouter(config, num_experts, self.options.gumbel_noise,
                                      sum_grad_over_tp=self.split_rows_over_tp)
        group_config = copy.copy(config)
        group_config.num_moe_experts = num_experts
        group_config.moe_router_topk = self.options.token_choice_topk
        return TopKRouter(config=group_config, pg_collection=pg_collection)

    def set_layer_number(self, layer_number: int) -> None:
        """Called by TransformerLayer; Megatron's routers log their losses per layer."""
        self.layer_number = layer_number
        if not self.expert_choice:
            for router in self.routers.values():
                router.set_layer_number(layer_number)

    def _select_by_token_choice(self, name, group_tokens) -> GroupSelection:
        """Each token takes its top-k experts of the group (Megatron's TopKRouter).

        Under sequence parallelism the TP ranks hold different numbers of a modality's tokens;
        Megatron's load-balancing loss assumes equal counts unless given a padding mask, so it
        gets an all-False one (no padding: in megatron-core 0.16 True marks padding), which makes
        it count the tokens across the TP group.
        """
        no_padding = None
        if self.config.sequence_parallel and self.tp_group.size() > 1:
            no_padding = torch.zeros(group_tokens.shape[0], 1, dtype=torch.bool,
                                     device=group_tokens.device)
        probs, routing_map = self.routers[name](group_tokens.unsqueeze(1), padding_mask=no_padding)
        expert, rows = routing_map.t().nonzero(as_tuple=True)
        return GroupSelection(rows, expert, probs[rows, expert])

    def _select(self, name, group_tokens, scores, chunk_counts: List[int]) -> GroupSelection:
        if not self.training and self.options.inference_routing == "aux":
            return self._select_by_aux_router(name, group_tokens, scores)
        return self._select_by_expert_choice(scores, chunk_counts)

    def _select_by_expert_choice(self, scores, chunk_counts: List[int]) -> GroupSelection:
        """Each expert takes its top-k_e tokens of the whole scope (ties: earlier token first)."""
        num_experts = scores.shape[1]
        scope_scores = scores.detach()
        if len(chunk_counts) > 1:
            scope_scores = gather_from_sequence_parallel_region(
                scope_scores, tensor_parallel_output_grad=False, group=self.tp_group,
                output_split_sizes=chunk_counts,
            )
        capacity = self.options.expert_capacity(scope_scores.shape[0], num_experts)
        order = torch.sort(scope_scores, dim=0, descending=True, stable=True).indices
        chosen = order[:capacity].t().reshape(-1)  # [|E| * k_e], expert-major
        expert = torch.arange(num_experts, device=scores.device).repeat_interleave(capacity)
        first = sum(chunk_counts[: self._chunk_rank(len(chunk_counts))])
        local = (chosen >= first) & (chosen < first + scores.shape[0])
        rows, expert = chosen[local] - first, expert[local]
        return GroupSelection(rows, expert, scores[rows, expert])

    def _select_by_aux_router(self, name, group_tokens, scores) -> GroupSelection:
        """Causal routing: expert j takes token x iff a_j(x) > 0.5."""
        taken = self.aux_routers[name](group_tokens) > 0.5  # [n, |E|]
        expert, rows = taken.t().nonzero(as_tuple=True)
        return GroupSelection(rows, expert, scores[rows, expert])

    def _aux_router_loss(self, name, group_tokens, selection: GroupSelection, shape, scope_tokens):
        """Binary cross-entropy of the auxiliary router against the assignment, averaged over the
        scope's tokens and the group's experts (this rank's share of that mean under SP)."""
        target = torch.zeros(shape, dtype=group_tokens.dtype, device=group_tokens.device)
        target[selection.rows, selection.expert] = 1.0
        predicted = self.aux_routers[name](group_tokens.detach())
        if self._records_statistics():
            ROUTING_STATISTICS.add_aux_router_decisions(
                f"moma/layer{self.layer_number or 0:03d}/{name}", predicted, target
            )
        total = F.binary_cross_entropy(predicted, target, reduction="sum")
        return total / max(1, scope_tokens * shape[1])

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Each group's modules under `{routers,experts,aux_routers}.{modality}.`; the experts
        keep megatron-core's SequentialMLP mapping to global expert indices under EP."""
        sharded = {}
        for kind, groups in self.named_children():
            for name, module in groups.items():
                sharded.update(sharded_state_dict_default(
                    module, f"{prefix}{kind}.{name}.", sharded_offsets, metadata
                ))
        return sharded

    def _chunk_rank(self, num_chunks: int) -> int:
        return self.tp_group.rank() if num_chunks > 1 else 0
