"""Routing statistics are summed over ranks before they become loads, shares and accuracies."""

import pytest
import torch
import torch.distributed as dist

from megatron_moma.layers.routing_statistics import RoutingStatistics
from megatron_moma.testing.multiprocess import run_on_ranks


def _two_ranks_report():
    stats = RoutingStatistics()
    if dist.get_rank() == 0:
        # 4 tokens: experts (0, 0, 1) took tokens (0, 1, 1): token 1 twice, tokens 2, 3 never.
        stats.add_expert_loads(3, "image", torch.tensor([0, 0, 1]), 2, torch.tensor([0, 1, 1]), 4)
        stats.add_aux_router_decisions("moma/layer003/image", torch.tensor([0.9, 0.2, 0.7, 0.1]),
                                       torch.tensor([1.0, 1.0, 0.0, 0.0]))
    else:
        stats.add_expert_loads(3, "image", torch.tensor([1]), 2, torch.tensor([0]), 2)
        stats.add("mod/layer002/selection", torch.tensor([1, 4]))
    first = stats.report()
    return first, stats.report()


def test_report_sums_every_rank_then_resets():
    first, second = run_on_ranks(_two_ranks_report, 2, timeout=60)[0]
    assert second == {}
    expected = {
        # loads: expert 0 took 2, expert 1 took 2 of 4 choices: ideal 2 each
        "moma/layer003/image/expert0_load": 1.0,
        "moma/layer003/image/expert1_load": 1.0,
        # 6 tokens: rank 0 {0: once, 1: twice, 2, 3: never}, rank 1 {0: once, 1: never}
        "moma/layer003/image/tokens_taken_by_0": 3 / 6,
        "moma/layer003/image/tokens_taken_by_1": 2 / 6,
        "moma/layer003/image/tokens_taken_by_2plus": 1 / 6,
        # decisions: 0.9>0.5 right, 0.2 wrong, 0.7 wrong, 0.1 right; recall: 1 of 2 assigned
        "moma/layer003/image/aux_router_accuracy": 0.5,
        "moma/layer003/image/aux_router_recall": 0.5,
        "mod/layer002/selection_rate": 0.25,
    }
    assert first.keys() == expected.keys()
    for key, value in expected.items():
        assert first[key] == pytest.approx(value), key
