"""Run MoMa's expert groups on rows chosen on this rank, wherever the experts live, and combine
the weighted outputs back into token order (on the megatron_moma.ops dispatch kernels).

Every group's experts are spread evenly over the expert-parallel (EP) ranks: with |E_g| experts
and EP size P, rank r owns experts r*|E_g|/P .. (r+1)*|E_g|/P - 1 of group g (the global expert
index megatron-core's SequentialMLP uses in checkpoints). A selected row's bucket ("slot") is
(owner rank, the owner's local expert across all groups); one bucket pass lays the rows out by
slot, one all-to-all of the per-slot counts tells each owner what comes, one all-to-all moves the
rows for all groups together, the owner regroups them by slot, runs its experts, and the rows go
back the same way to a weighted combine.

Expert tensor parallelism as megatron-core's MoEAlltoAllTokenDispatcher does it: with an
expert-TP group of size T > 1, each expert's linear_fc1 is column-parallel and its linear_fc2
row-parallel without its own all-reduce over that group, so every expert-TP rank holds a slice
of every local expert. After the EP all-to-all the rows that reached the T ranks of the group are
all-gathered (each rank runs its slice on all of them), and after the experts the partial outputs
are reduce-scattered back to the rank that received each row; the backward passes are the
reduce-scatter and all-gather the other way. The expert-TP peers may hold different tokens
(sequence-parallel chunks, other data-parallel micro-batches or shares of the chosen rows).

With P = T = 1 there is no communication at all. The only host synchronization is the counts.
"""

from dataclasses import dataclass
from typing import List, Sequence

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.tensor_parallel import (
    all_to_all,
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)

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


def group_size(group) -> int:
    """Size of a process group; 1 for None (no parallelism of that kind)."""
    return 1 if group is None else group.size()


def run_expert_groups(tokens: torch.Tensor, groups: Sequence[ExpertSelection],
                      experts: Sequence[torch.nn.Module], num_experts: Sequence[int],
                      ep_group, expert_tp_group=None) -> torch.Tensor:
    """tokens [N, h] -> [N, h], out[t] = sum over selections (g, j, t, w) of w * FFN_{g,j}(tokens[t]).

    `experts[g]` is group g's megatron-core expert module (SequentialMLP or TEGroupedMLP) holding
    this rank's `num_experts[g] / EP` experts (their expert-TP slices when `expert_tp_group` has
    more than one rank). A token nobody selected gets 0.
    """
    ep_size = group_size(ep_group)
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
    exchange = _CountExchange(layout.counts.view(ep_size, slots_per_rank), ep_group,
                              expert_tp_group)
    processed = _run_on_owners(rows, exchange, experts, local_counts)
    return unpermute_combine(processed, weight, layout)


class _CountExchange:
    """Who sends how many rows to whom, known on every rank after one host synchronization.

    P EP ranks, T expert-TP peers, S local slots. `arrived` [T, P, S] (on the device): rows that
    each expert-TP peer (this rank at its own index) received from each EP rank for each slot;
    the rows the experts see are in that (peer, EP source, slot) order. Host lists: send_split [P]
    rows this rank sends to each EP rank, receive_split [P] rows it receives from each,
    peer_split [T] rows each peer received, rows_per_slot [S] rows each local slot processes.
    """

    def __init__(self, send_counts: torch.Tensor, ep_group, expert_tp_group):
        self.ep_group, self.expert_tp_group = ep_group, expert_tp_group
        ep_size, slots = send_counts.shape
        received = send_counts
        if ep_size > 1:
            received = torch.empty_like(send_counts)  # [source rank, local slot]
            dist.all_to_all_single(received.view(-1), send_counts.reshape(-1), group=ep_group)
        self.arrived = received.unsqueeze(0)
        if group_size(expert_tp_group) > 1:
            self.arrived = gather_from_sequence_parallel_region(
                received.reshape(-1), tensor_parallel_output_grad=False, group=expert_tp_group,
            ).view(-1, ep_size, slots)
        host = torch.cat([send_counts.reshape(-1), self.arrived.reshape(-1)]).tolist()
        per_slot = [host[i:i + slots] for i in range(0, len(host), slots)]  # [P + T * P][S]
        send = per_slot[:ep_size]
        arrived = [per_slot[i:i + ep_size] for i in range(ep_size, len(per_slot), ep_size)]
        tp_rank = expert_tp_group.rank() if group_size(expert_tp_group) > 1 else 0
        self.send_split = [sum(per_slot) for per_slot in send]
        self.receive_split = [sum(per_slot) for per_slot in arrived[tp_rank]]
        self.peer_split = [sum(map(sum, per_source)) for per_source in arrived]
        self.rows_per_slot = [sum(column) for column in zip(*sum(arrived, []))]


def _run_local_experts(rows: torch.Tensor, rows_per_slot: List[int],
                       experts: Sequence[torch.nn.Module], local_counts: Sequence[int]) -> torch.Tensor:
    """rows [M, h] sorted by local slot, rows_per_slot[s] of slot s -> unweighted outputs [M, h].

    The combine applies the routing weights afterwards, so the experts run without
    probabilities: megatron-core's local SequentialMLP experts are called one by one with none
    (its own forward would multiply every FFN intermediate by all-ones probabilities, forward and
    backward); other expert modules get all-ones probabilities."""
    outputs, start, first_slot = [], 0, 0
    for module, count in zip(experts, local_counts):
        tokens_per_expert = rows_per_slot[first_slot : first_slot + count]
        end = start + sum(tokens_per_expert)
        chunk = rows[start:end]
        if type(module) is SequentialMLP and not module.config.fp8:
            for expert, part in zip(module.local_experts, chunk.split(tokens_per_expert)):
                output, bias = expert(part)
                outputs.append(output if bias is None else output + bias)
        else:
            ones = torch.ones(chunk.shape[0], dtype=chunk.dtype, device=chunk.device)
            outputs.append(module(chunk, torch.tensor(tokens_per_expert, dtype=torch.long), ones)[0])
        start, first_slot = end, first_slot + count
    return torch.cat(outputs)


def _run_on_owners(rows: torch.Tensor, exchange: _CountExchange,
                   experts: Sequence[torch.nn.Module], local_counts: Sequence[int]) -> torch.Tensor:
    """rows [R, h] by (owner rank, slot) -> outputs [R, h] in the same order: all-to-all over
    EP, all-gather over expert-TP, experts, reduce-scatter over expert-TP, all-to-all back."""
    ep_group, expert_tp_group = exchange.ep_group, exchange.expert_tp_group
    received = rows
    if group_size(ep_group) > 1:
        received = all_to_all(ep_group, rows, exchange.receive_split, exchange.send_split)
    if group_size(expert_tp_group) > 1:
        received = gather_from_sequence_parallel_region(
            received, group=expert_tp_group, output_split_sizes=exchange.peer_split)
    sources, slots = exchange.arrived.shape[0] * exchange.arrived.shape[1], exchange.arrived.shape[2]
    if sources == 1:  # already by slot
        processed = _run_local_experts(received, exchange.rows_per_slot, experts, local_counts)
    else:
        # Received rows come by (peer, source, slot); the experts want them by slot.
        slot_of_received = torch.repeat_interleave(
            torch.arange(slots, device=rows.device).repeat(sources), exchange.arrived.reshape(-1),
            output_size=received.shape[0],
        )
        arrival = bucket(torch.arange(received.shape[0], device=rows.device), slot_of_received,
                         received.shape[0], slots)
        processed = _run_local_experts(permute(received, arrival), exchange.rows_per_slot,
                                       experts, local_counts)
        processed = unpermute_combine(processed, None, arrival)
    if group_size(expert_tp_group) > 1:
        processed = reduce_scatter_to_sequence_parallel_region(
            processed, group=expert_tp_group, input_split_sizes=exchange.peer_split)
    if group_size(ep_group) > 1:
        processed = all_to_all(ep_group, processed, exchange.send_split, exchange.receive_split)
    return processed
