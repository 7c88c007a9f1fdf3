"""megatron-core dist_checkpointing (torch_dist) on CPU: a model saved under one layout loads
under another with every parameter element equal (the resharding the trainer will rely on).
For MoMa and MoT this checks every new parameter's sharded_state_dict: routers, auxiliary
routers and norms replicated over TP and EP, experts by global expert index within their
modality group (split over expert-TP like Megatron's experts), per-modality projections split
over TP along Megatron's axes."""

import pytest
import torch
from megatron.core import dist_checkpointing

from megatron_moma.config import MoDOptions, MoMaOptions, MoTOptions
from megatron_moma.parallel.layout import ParallelLayout
from megatron_moma.testing import gpt_runs
from megatron_moma.testing.multiprocess import run_on_ranks

MOE = gpt_runs.TinyGPT(num_experts=4)
MOMA = gpt_runs.TinyGPT(moma=MoMaOptions(experts_per_modality=(2, 2)))
MOT_MOMA = gpt_runs.TinyGPT(mot=MoTOptions(qk_layernorm=True),
                            moma=MoMaOptions(experts_per_modality=(2, 2)))
MOD_MOMA = gpt_runs.TinyGPT(mod=MoDOptions(capacity=0.5), moma=MoMaOptions(experts_per_modality=(2, 2)))
SPEC = gpt_runs.TrainSpec(optimizer="sgd", lr=0.5, steps=1)


def _train_one_step_and_save(model, layout, directory):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    gpt_runs.initialize(layout, SPEC)
    chunks = gpt_runs.build_model(model, layout, SPEC)
    gpt_runs.set_weights_by_global_name(chunks)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="sgd", lr=SPEC.lr, sgd_momentum=0.0, weight_decay=0.0), chunks
    )
    gpt_runs.train_step(chunks, optimizer, model, SPEC, step=0)
    dist_checkpointing.save(chunks[0].module.sharded_state_dict(), directory)
    return gpt_runs.snapshot_global_slices(chunks)


def _load(model, layout, directory):
    gpt_runs.initialize(layout, SPEC)
    chunks = gpt_runs.build_model(model, layout, SPEC)
    model = chunks[0].module
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), directory))
    return gpt_runs.snapshot_global_slices(chunks)


TP2_SP_EP2_ETP1 = ParallelLayout(tensor_parallel_size=2, sequence_parallel=True,
                                 expert_parallel_size=2, expert_tensor_parallel_size=1)
TP2_SP_EP2_ETP2 = ParallelLayout(tensor_parallel_size=2, sequence_parallel=True,
                                 expert_parallel_size=2, expert_tensor_parallel_size=2)
TP2_SP_ETP2 = ParallelLayout(tensor_parallel_size=2, sequence_parallel=True,
                             expert_tensor_parallel_size=2)


@pytest.mark.parametrize(
    "model, save_layout, save_ranks, load_layout, load_ranks",
    [
        (MOE, ParallelLayout(tensor_parallel_size=2, sequence_parallel=True, expert_parallel_size=2),
         4, ParallelLayout(), 1),
        (MOE, ParallelLayout(), 1, ParallelLayout(pipeline_parallel_size=2, expert_parallel_size=2), 4),
        (MOMA, TP2_SP_EP2_ETP1, 4, ParallelLayout(), 1),
        (MOMA, ParallelLayout(), 1, TP2_SP_EP2_ETP1, 4),
        (MOMA, TP2_SP_EP2_ETP2, 4, ParallelLayout(), 1),
        (MOMA, ParallelLayout(), 1, TP2_SP_ETP2, 2),
        (MOT_MOMA, TP2_SP_EP2_ETP1, 4, ParallelLayout(pipeline_parallel_size=2), 2),
        (MOD_MOMA, TP2_SP_EP2_ETP1, 4, ParallelLayout(pipeline_parallel_size=2), 2),
    ],
    ids=["moe-tp2-sp-ep2-to-ws1", "moe-ws1-to-pp2-ep2", "moma-tp2-sp-ep2-to-ws1",
         "moma-ws1-to-tp2-sp-ep2", "moma-tp2-sp-ep2-etp2-to-ws1", "moma-ws1-to-tp2-sp-etp2",
         "mot+moma-tp2-sp-ep2-to-pp2", "mod+moma-tp2-sp-ep2-to-pp2"],
)
def test_checkpoint_reshards_across_layouts(tmp_path, model, save_layout, save_ranks, load_layout,
                                            load_ranks):
    saved = run_on_ranks(_train_one_step_and_save, save_ranks, model, save_layout, str(tmp_path),
                         timeout=240)
    loaded = run_on_ranks(_load, load_ranks, model, load_layout, str(tmp_path), timeout=240)
    expected = gpt_runs.assemble_global(saved)
    actual = gpt_runs.assemble_global(loaded)
    assert actual.keys() == expected.keys()
    for key in expected:
        initial = gpt_runs.global_initial_value(key, tuple(expected[key].shape))
        assert not torch.equal(expected[key], initial), f"{key} did not train; nothing checked"
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)
