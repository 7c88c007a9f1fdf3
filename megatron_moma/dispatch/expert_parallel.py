"""Run MoMa's expert groups on rows chosen on this rank, wherever the experts live, and combine
the weighted outputs back into token order (on the megatron_moma.ops dispatch kernels).

Every group's experts are spread evenly over the expert-parallel (EP) ranks: with |E_g| experts
and EP size P, rank r owns experts r*|E_g|/P .. (r+1)*|E_g|/P - 1 of group g (the global expert
index megatron-core's SequentialMLP uses in checkpoints). A selected row's bucket ("slot") is
(owner rank, the owner's local expert across all groups); one bucket pass lays the rows out by
slot, one all-to-all of the per-slot counts tells each owner what comes, one all-to-all moves the
rows for all groups together, the owner regroups them by slot, runs its experts, and the rows go
back the same way to a weighted combine. With P = 1 there is no communication at all. The only
host synchronizations are the counts.
"""

from dataclasses import dataclass
from typing import List, Sequence

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import all_to_all

from megatron_moma.ops import bucket, permute, unpermute_combine


@dataclass
class ExpertSelection:
    """Which tokens of this rank one group's experts take, and with what weight.

    token: [R] int64 positions in the rank's [N, h] tokens (a token may repeat: several experts
    can take it); expert: [R] int64 expert index within the group; weight: [R] combine weight.
    """

    token: torch.Tensor
    expert: torch.Tensor
    weight: torch.Tensor


def run_expert_groups(tokens: torch.Tensor, groups: Sequence[ExpertSelection],
                      experts: Sequence[torch.nn.Module], num_experts: Sequence[int],
                      ep_group) -> torch.Tensor:
    """tokens [N, h] -> [N, h], out[t] = sum over selections (g, j, t, w) of w * FFN_{g,j}(tokens[t]).

    `experts[g]` is group g's megatron-core expert module (SequentialMLP or TEGroupedMLP) holding
    this rank's `num_experts[g] / EP` experts. A token nobody selected gets 0.
    """
    ep_size = ep_group.size() if ep_group is not None else 1
    local_counts = [n // ep_size for n in num_experts]  # experts of each group per rank
    slot_offsets = [0]
    for count in local_counts:
        slot_offsets.append(slot_offsets[-1] + count)
    slots_per_rank = slot_offsets[-1]

    slot = torch.cat([
        (group.expert // count) * slots_per_rank + offset + group.expert % count
        for group, count, offset in zip(groups, local_counts, slot_offsets)
    ])
    layout = bucket(torch.cat([group.token for group in groups]), slot, tokens.shape[0],
                    ep_size * slots_per_rank)
    weight = torch.cat([group.weight for group in groups])[layout.order]
    rows = permute(tokens, layout)  # [R, h], by (owner rank, slot)
    if ep_size == 1:
        processed = _run_local_experts(rows, layout.counts.tolist(), experts, local_counts)
    else:
        counts = layout.counts.view(ep_size, slots_per_rank)
        processed = _run_on_owners(rows, counts, experts, local_counts, ep_group)
    return unpermute_combine(processed, weight, layout)


def _run_local_experts(rows: torch.Tensor, rows_per_slot: List[int],
                       experts: Sequence[torch.nn.Module], local_counts: Sequence[int]) -> torch.Tensor:
    """rows [M, h] sorted by local slot, rows_per_slot[s] of slot s -> unweighted outputs [M, h]."""
    outputs, start, first_slot = [], 0, 0
    for module, count in zip(experts, local_counts):
        tokens_per_expert = rows_per_slot[first_slot : first_slot + count]
        end = start + sum(tokens_per_expert)
        chunk = rows[start:end]
        ones = torch.ones(chunk.shape[0], dtype=chunk.dtype, device=chunk.device)
        output, _ = module(chunk, torch.tensor(tokens_per_expert, dtype=torch.long), ones)
        outputs.append(output)
        start, first_slot = end, first_slot + count
    return torch.cat(outputs)


def _run_on_owners(rows: torch.Tensor, send_counts: torch.Tensor,
                   experts: Sequence[torch.nn.Module], local_counts: Sequence[int],
                   ep_group) -> torch.Tensor:
    """rows [R, h] by (owner rank, slot), send_counts [P, S] -> outputs [R, h] in the same order."""
    ep_size, slots_per_rank = send_counts.shape
    recv_counts = torch.empty_like(send_counts)  # [source rank, local slot]
    dist.all_to_all_single(recv_counts.view(-1), send_counts.reshape(-1), group=ep_group)
    both = torch.stack([send_counts, recv_counts]).tolist()
    send_split = [sum(per_rank) for per_rank in both[0]]
    recv_split = [sum(per_rank) for per_rank in both[1]]
    received = all_to_all(ep_group, rows, recv_split, send_split)

    # Received rows come by (source, slot); the experts want them by (slot, source).
    slot_of_received = torch.repeat_interleave(
        torch.arange(slots_per_rank, device=rows.device).repeat(ep_size), recv_counts.reshape(-1),
        output_size=received.shape[0],
    )
    arrival = bucket(torch.arange(received.shape[0], device=rows.device), slot_of_received,
                     received.shape[0], slots_per_rank)
    rows_per_slot = [sum(column) for column in zip(*both[1])]
    processed = _run_local_experts(permute(received, arrival), rows_per_slot, experts,
                                   local_counts)
    back_in_arrival_order = unpermute_combine(processed, None, arrival)
    return all_to_all(ep_group, back_in_arrival_order, send_split, recv_split)
