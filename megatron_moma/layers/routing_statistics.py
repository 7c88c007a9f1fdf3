"""Routing statistics of MoMa and MoD layers, accumulated during training for the logs.

Each layer adds counts (detached tensors: no host sync in the forward pass) under a key naming its
global layer number; `ROUTING_STATISTICS.report()` sums every rank's counts (ranks hold different
tokens and, under pipeline parallelism, different layers) and turns them into the scalars users
ask for: tokens per expert as load against the ideal, the share of tokens taken by 0 / 1 / 2+
experts (expert-choice coverage), auxiliary-router accuracy and recall against the assignment it
learns, and the MoD selection rate. Like megatron-core's MoE loss tracker it is process-global.
"""

from typing import Dict

import torch
import torch.distributed as dist


class RoutingStatistics:
    """Sums of routing counts per key since the last report."""

    def __init__(self):
        self._sums: Dict[str, torch.Tensor] = {}

    def add(self, key: str, counts: torch.Tensor) -> None:
        counts = counts.detach().to(torch.float64)
        if key in self._sums:
            self._sums[key] += counts
        else:
            self._sums[key] = counts.clone()

    def add_expert_loads(self, layer: int, group: str, experts: torch.Tensor, num_experts: int,
                         rows: torch.Tensor, num_tokens: int) -> None:
        """experts, rows [R]: the chosen (row, expert) pairs among `num_tokens` tokens."""
        prefix = f"moma/layer{layer:03d}/{group}"
        self.add(f"{prefix}/tokens_per_expert", torch.bincount(experts, minlength=num_experts))
        taken = torch.bincount(rows, minlength=num_tokens)
        coverage = torch.stack([(taken == 0).sum(), (taken == 1).sum(), (taken >= 2).sum()])
        self.add(f"{prefix}/coverage", coverage)

    def add_aux_router_decisions(self, prefix: str, predicted: torch.Tensor,
                                 assigned: torch.Tensor) -> None:
        """predicted probabilities and 0/1 assignment of the same shape."""
        chosen, wanted = predicted > 0.5, assigned > 0.5
        self.add(f"{prefix}/aux_router", torch.stack([
            (chosen == wanted).sum(), torch.tensor(wanted.numel(), device=wanted.device),
            (chosen & wanted).sum(), wanted.sum(),
        ]))

    def report(self) -> Dict[str, float]:
        """Collective over all ranks: the scalars of everything added since the last report."""
        local = {key: value.cpu().tolist() for key, value in self._sums.items()}
        self._sums = {}
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, local)
        totals: Dict[str, list] = {}
        for sums in everyone:
            for key, values in sums.items():
                totals[key] = [a + b for a, b in zip(totals[key], values)] if key in totals else values
        scalars = {}
        for key, values in sorted(totals.items()):
            prefix, kind = key.rsplit("/", 1)
            scalars.update(_scalars(prefix, kind, values))
        return scalars


def _scalars(prefix: str, kind: str, values: list) -> Dict[str, float]:
    if kind == "tokens_per_expert":
        ideal = sum(values) / len(values) or 1.0
        return {f"{prefix}/expert{j}_load": count / ideal for j, count in enumerate(values)}
    if kind == "coverage":
        total = sum(values) or 1.0
        return {f"{prefix}/tokens_taken_by_{name}": count / total
                for name, count in zip(("0", "1", "2plus"), values)}
    if kind == "aux_router":
        correct, decisions, true_positives, assigned = values
        return {f"{prefix}/aux_router_accuracy": correct / max(decisions, 1.0),
                f"{prefix}/aux_router_recall": true_positives / max(assigned, 1.0)}
    if kind == "selection":
        chosen, total = values
        return {f"{prefix}/selection_rate": chosen / max(total, 1.0)}
    raise ValueError(f"unknown routing statistic {kind!r}")


ROUTING_STATISTICS = RoutingStatistics()
