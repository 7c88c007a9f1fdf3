"""The expert-parallel dispatcher: outputs and gradients under EP2, EP4, expert-TP 2 and EP2 x
expert-TP 2 (gloo ranks) equal the same rows run on one process holding every whole expert.

Experts are stand-ins with megatron-core's expert-module interface (one linear map per expert),
so the test checks the dispatch (slots, all-to-alls, expert-TP gather and reduce-scatter,
regrouping, weighted combine), not the MLPs. Under expert-TP each peer holds a slice of every
expert's input dimension and returns a partial sum, as megatron's row-parallel linear_fc2 does.
"""

import pytest
import torch
import torch.distributed as dist

from megatron_moma.dispatch.expert_parallel import ExpertSelection, run_expert_groups
from megatron_moma.testing.multiprocess import run_on_ranks

HIDDEN = 16
NUM_EXPERTS = (4, 8)  # two modality groups
SOURCE_RANKS = 4  # rows come from 4 "ranks"; EP1 runs all of them in one process


class LinearExperts(torch.nn.Module):
    """A group's local experts as megatron-core calls them: (rows sorted by expert,
    tokens_per_expert, probs) -> (rows[:, inputs] @ W_e, None), W_e [h / T, h] the rows
    `inputs` of expert e's full map (all of it without expert-TP)."""

    def __init__(self, weights: torch.Tensor, inputs: slice = slice(None)):  # [local experts, h/T, h]
        super().__init__()
        self.weight = torch.nn.Parameter(weights.clone())
        self.inputs = inputs

    def forward(self, rows, tokens_per_expert, probs):
        chunks = rows[:, self.inputs].split(tokens_per_expert.tolist())
        return torch.cat([rows[:0]] + [c @ w for c, w in zip(chunks, self.weight)]), None


def global_expert_weights():
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(n, HIDDEN, HIDDEN, generator=generator) / HIDDEN**0.5 for n in NUM_EXPERTS]


def rank_inputs(rank):
    """Source rank `rank`'s tokens [N, h] and selections: each expert takes a few tokens of its
    group (a token can be taken by several experts); rank 1 has no tokens of group 1."""
    generator = torch.Generator().manual_seed(100 + rank)
    num_tokens = 20 + 3 * rank
    tokens = torch.randn(num_tokens, HIDDEN, generator=generator)
    modality = torch.randint(0, 2, (num_tokens,), generator=generator)
    if rank == 1:
        modality.zero_()
    selections = []
    for group, experts in enumerate(NUM_EXPERTS):
        members = (modality == group).nonzero().flatten()
        taken = min(3, members.numel())
        token = torch.cat([members[torch.randperm(members.numel(), generator=generator)[:taken]]
                           for _ in range(experts)])
        expert = torch.arange(experts).repeat_interleave(taken)
        weight = torch.rand(token.numel(), generator=generator)
        selections.append((token, expert, weight))
    return tokens, selections


def run_rank(rank, expert_weights, ep_group=None, expert_tp_group=None):
    """Forward + backward on source rank `rank`; -> output, grads of tokens, weights, experts."""
    tokens, selections = rank_inputs(rank)
    tokens.requires_grad_(True)
    weights = [w.requires_grad_(True) for _, _, w in selections]
    ep_size, ep_rank = (1, 0) if ep_group is None else (ep_group.size(), ep_group.rank())
    tp_size, tp_rank = (1, 0) if expert_tp_group is None else (expert_tp_group.size(),
                                                                 expert_tp_group.rank())
    inputs = slice(tp_rank * HIDDEN // tp_size, (tp_rank + 1) * HIDDEN // tp_size)
    experts = [LinearExperts(w.chunk(ep_size)[ep_rank][:, inputs], inputs) for w in expert_weights]
    groups = [ExpertSelection(token, expert, weight)
              for (token, expert, _), weight in zip(selections, weights)]
    output = run_expert_groups(tokens, groups, experts, NUM_EXPERTS, ep_group, expert_tp_group)
    grad_out = torch.randn(output.shape, generator=torch.Generator().manual_seed(200 + rank))
    (output * grad_out).sum().backward()
    return (output.detach(), tokens.grad, [w.grad for w in weights],
            [e.weight.grad for e in experts])


def expert_groups(ep_size, tp_size):
    """(EP group, expert-TP group) of this rank, ranks laid out as megatron-core lays out expert
    ranks: expert-TP fastest, so rank = ep_rank * tp_size + tp_rank; None for a size of 1."""
    rank = dist.get_rank()
    ep_groups = [dist.new_group([e * tp_size + t for e in range(ep_size)]) for t in range(tp_size)]
    tp_groups = [dist.new_group([e * tp_size + t for t in range(tp_size)]) for e in range(ep_size)]
    return (ep_groups[rank % tp_size] if ep_size > 1 else None,
            tp_groups[rank // tp_size] if tp_size > 1 else None)


def _expert_parallel_rank(expert_weights, ep_size, tp_size):
    """Every rank is a source of SOURCE_RANKS / world rows in turn."""
    rank, world = dist.get_rank(), dist.get_world_size()
    ep_group, tp_group = expert_groups(ep_size, tp_size)
    return [run_rank(rank + world * step, expert_weights, ep_group, tp_group)
            for step in range(SOURCE_RANKS // world)]


@pytest.mark.parametrize("ep_size, tp_size", [(2, 1), (4, 1), (1, 2), (2, 2)],
                         ids=["ep2", "ep4", "etp2", "ep2-etp2"])
def test_expert_parallel_equals_one_process(ep_size, tp_size):
    expert_weights = global_expert_weights()
    reference = [run_rank(rank, expert_weights) for rank in range(SOURCE_RANKS)]
    world = ep_size * tp_size
    per_rank = run_on_ranks(_expert_parallel_rank, world, expert_weights, ep_size, tp_size,
                            timeout=120)
    for rank, results in enumerate(per_rank):
        for step, (output, token_grad, weight_grads, _) in enumerate(results):
            expected = reference[rank + world * step]
            torch.testing.assert_close(output, expected[0], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(token_grad, expected[1], rtol=1e-6, atol=1e-6)
            for got, want in zip(weight_grads, expected[2]):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # An expert's gradient on its owner sums the contributions of every source rank; each
    # source rank's steps run separately here, so sum over steps as well. Rank (e, t) holds the
    # input rows t of the experts of EP rank e.
    for group in range(len(NUM_EXPERTS)):
        expected = sum(result[3][group] for result in reference)
        got = torch.cat([
            torch.cat([sum(result[3][group] for result in per_rank[e * tp_size + t])
                       for t in range(tp_size)], dim=1)
            for e in range(ep_size)
        ])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def _no_rows_anywhere(expert_weights):
    ep_group, tp_group = expert_groups(2, 2)
    inputs = slice(tp_group.rank() * HIDDEN // 2, (tp_group.rank() + 1) * HIDDEN // 2)
    experts = [LinearExperts(w.chunk(2)[ep_group.rank()][:, inputs], inputs) for w in expert_weights]
    tokens = torch.randn(5, HIDDEN, requires_grad=True)
    nothing = ExpertSelection(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                              torch.zeros(0))
    output = run_expert_groups(tokens, [nothing, nothing], experts, NUM_EXPERTS, ep_group, tp_group)
    output.sum().backward()
    return output.detach(), tokens.grad, [e.weight.grad for e in experts]


def test_no_rows_on_any_rank_gives_zeros_and_keeps_the_experts_in_the_graph():
    """No selected row anywhere (a modality absent from every micro-batch): the collectives still
    match up, the output is 0 and every expert weight gets a (zero) gradient, so DDP's buckets
    complete."""
    for output, token_grad, expert_grads in run_on_ranks(_no_rows_anywhere, 4,
                                                         global_expert_weights(), timeout=120):
        assert torch.equal(output, torch.zeros(5, HIDDEN))
        assert torch.equal(token_grad, torch.zeros(5, HIDDEN))
        assert all(g is not None and not g.any() for g in expert_grads)
