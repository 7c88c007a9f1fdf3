"""The auxiliary-router stage: with the main model frozen, only auxiliary routers change."""

import pytest
import torch

from megatron_moma.config import MoMaOptions
from megatron_moma.models.aux_router_stage import train_only_auxiliary_routers
from megatron_moma.parallel.layout import ParallelLayout
from megatron_moma.testing import gpt_runs
from megatron_moma.testing.multiprocess import run_on_ranks

MOMA = gpt_runs.TinyGPT(moma=MoMaOptions(experts_per_modality=(2, 2)))


def test_only_auxiliary_routers_train():
    spec = gpt_runs.TrainSpec(optimizer="adam", lr=1e-2, steps=3, train_only_auxiliary_routers=True)
    result = run_on_ranks(gpt_runs.train, 2, MOMA, ParallelLayout(expert_parallel_size=2), spec,
                          timeout=120)
    final = gpt_runs.assemble_global([r.params_at_end for r in result])
    changed = {key for key, value in final.items()
               if not torch.equal(value, gpt_runs.global_initial_value(key, tuple(value.shape)))}
    assert changed and all(".aux_routers." in key for key in changed), changed
    assert any(".aux_routers.text." in key for key in changed)
    assert any(".aux_routers.image." in key for key in changed)
    # The main model is frozen and aux routers do not route in training: the language-model
    # losses are those of a model that does not learn at all.
    untrained = run_on_ranks(gpt_runs.train, 1, MOMA, ParallelLayout(),
                             gpt_runs.TrainSpec(optimizer="adam", lr=0.0, steps=3), timeout=120)[0]
    losses = [r.losses for r in result if r.losses][0]
    assert losses == pytest.approx(untrained.losses, abs=1e-6)


def test_freezing_a_model_without_auxiliary_routers_is_refused():
    with pytest.raises(ValueError, match="no auxiliary routers"):
        train_only_auxiliary_routers([torch.nn.Linear(2, 2)])
