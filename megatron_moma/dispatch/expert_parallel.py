"""Run MoMa's expert groups on rows chosen on this rank, wherever the experts live (pure torch).

Every group's experts are spread evenly over the expert-parallel (EP) ranks: with |E_g| experts
and EP size P, rank r owns experts r*|E_g|/P .. (r+1)*|E_g|/P - 1 of group g (the global expert
index megatron-core's SequentialMLP uses in checkpoints). Rows chosen for an expert are sent to
its owner by one all-to-all for all groups together, after one all-to-all of the per-expert
counts, processed there expert by expert, and sent back in the same order.
"""

from dataclasses import dataclass
from typing import List, Sequence

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import all_to_all


@dataclass
class ExpertRows:
    """Rows of one group headed for its experts, sorted by expert.

    tokens: [R, h] the rows; expert: [R] int64 expert index within the group, non-decreasing.
    """

    tokens: torch.Tensor
    expert: torch.Tensor


def run_expert_groups(groups: Sequence[ExpertRows], experts: Sequence[torch.nn.Module],
                      num_experts: Sequence[int], ep_group) -> List[torch.Tensor]:
    """Unweighted expert outputs, one [R_g, h] tensor per group, rows in the input order.

    `experts[g]` is group g's megatron-core expert module (SequentialMLP or TEGroupedMLP) holding
    this rank's `num_experts[g] / EP` experts.
    """
    ep_size = ep_group.size() if ep_group is not None else 1
    if ep_size == 1:
        return [_run_local(rows.tokens, rows.expert, module, n)
                for rows, module, n in zip(groups, experts, num_experts)]
    return _run_across_ranks(groups, experts, num_experts, ep_group, ep_size)


def _run_local(tokens, expert_of_row, module, num_local_experts) -> torch.Tensor:
    tokens_per_expert = torch.bincount(expert_of_row, minlength=num_local_experts)
    ones = torch.ones(tokens.shape[0], dtype=tokens.dtype, device=tokens.device)
    output, _ = module(tokens, tokens_per_expert, ones)
    return output


def _run_across_ranks(groups, experts, num_experts, ep_group, ep_size) -> List[torch.Tensor]:
    local_counts = [n // ep_size for n in num_experts]  # experts of each group per rank
    slot_offsets = [0]
    for count in local_counts:
        slot_offsets.append(slot_offsets[-1] + count)
    slots_per_rank = slot_offsets[-1]

    # A row's slot is (owner rank, the owner's local expert across all groups).
    slots = torch.cat([
        (rows.expert // count) * slots_per_rank + offset + rows.expert % count
        for rows, count, offset in zip(groups, local_counts, slot_offsets)
    ])
    tokens = torch.cat([rows.tokens for rows in groups])
    send_order = torch.sort(slots, stable=True).indices
    send_counts = torch.bincount(slots, minlength=ep_size * slots_per_rank)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=ep_group)
    send_counts = send_counts.view(ep_size, slots_per_rank)
    recv_counts = recv_counts.view(ep_size, slots_per_rank)  # [source rank, local slot]

    received = all_to_all(ep_group, tokens[send_order],
                          recv_counts.sum(1).tolist(), send_counts.sum(1).tolist())

    # Received rows come by (source, slot); the experts want them by (slot, source).
    slot_of_received = torch.repeat_interleave(
        torch.arange(slots_per_rank).repeat(ep_size), recv_counts.reshape(-1)
    )
    by_slot = torch.sort(slot_of_received, stable=True).indices
    rows_per_slot = recv_counts.sum(0)
    outputs, start = [], 0
    for module, count, offset in zip(experts, local_counts, slot_offsets):
        tokens_per_expert = rows_per_slot[offset : offset + count]
        end = start + int(tokens_per_expert.sum())
        rows = received[by_slot[start:end]]
        ones = torch.ones(rows.shape[0], dtype=rows.dtype, device=rows.device)
        output, _ = module(rows, tokens_per_expert, ones)
        outputs.append(output)
        start = end
    processed = torch.empty_like(received).index_copy(0, by_slot, torch.cat(outputs))

    returned = all_to_all(ep_group, processed,
                          send_counts.sum(1).tolist(), recv_counts.sum(1).tolist())
    in_input_order = torch.empty_like(returned).index_copy(0, send_order, returned)
    return list(in_input_order.split([rows.tokens.shape[0] for rows in groups]))
