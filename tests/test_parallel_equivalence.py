"""Parallel layouts equal world size 1: megatron-core's own parallelism run on CPU through
megatron_moma.platform, and our MoMa layer under it.

A tiny GPTModel (local spec; dense, with Megatron's MoE MLP, and with MoMa) trains 3 steps from the same
weights (set by global parameter name) on the same global batch under each layout. Compared with
the single-process run of the same model:
- SGD (plain DDP): loss and grad norm of every step, and the gradient of every parameter element,
  recovered exactly from the first update as (w0 - w1) / lr, assembled from all ranks' shards;
- Adam through megatron-core's distributed optimizer: loss and grad norm of every step and every
  parameter after the last step.
Tolerances are for fp32 reductions in a different order (TP/SP split the sums, EP moves them).
"""

import functools

import pytest
import torch

from megatron_moma.config import MoDOptions, MoMaOptions, MoTOptions
from megatron_moma.parallel.layout import ParallelLayout
from megatron_moma.testing import gpt_runs
from megatron_moma.testing.multiprocess import run_on_ranks

DENSE = gpt_runs.TinyGPT()
MOE = gpt_runs.TinyGPT(num_experts=4)
MOMA = gpt_runs.TinyGPT(moma=MoMaOptions(experts_per_modality=(2, 2)))
MOMA_GROUPED = gpt_runs.TinyGPT(moma=MoMaOptions(experts_per_modality=(2, 2)), moe_grouped_gemm=True)
MOMA_TOKEN_CHOICE = gpt_runs.TinyGPT(moma=MoMaOptions(
    experts_per_modality=(2, 4), routing="token_choice", token_choice_topk=2))
MOT = gpt_runs.TinyGPT(mot=MoTOptions(qk_layernorm=True))
MOT_POST_NORM = gpt_runs.TinyGPT(mot=MoTOptions(norm_placement="post", untie={"ffn", "attention"}))
MOT_MOMA = gpt_runs.TinyGPT(mot=MoTOptions(), moma=MoMaOptions(experts_per_modality=(2, 2)))
MOD = gpt_runs.TinyGPT(mod=MoDOptions())
MOD_MOMA = gpt_runs.TinyGPT(mod=MoDOptions(capacity=0.5), moma=MoMaOptions(experts_per_modality=(2, 2)))
MOD_MOT = gpt_runs.TinyGPT(mod=MoDOptions(), mot=MoTOptions())
SGD = gpt_runs.TrainSpec(optimizer="sgd", lr=0.5)
ADAM = gpt_runs.TrainSpec(optimizer="adam", lr=1e-2, adam_eps=1e-3)

LOSS_TOLERANCE = dict(rtol=1e-6, atol=2e-6)
GRAD_NORM_TOLERANCE = dict(rtol=2e-5, atol=1e-6)
GRAD_TOLERANCE = dict(rtol=1e-3, atol=2e-5)
PARAM_TOLERANCE = dict(rtol=1e-4, atol=2e-6)

CASES = [
    # (model, world size, layout)
    (DENSE, 2, ParallelLayout()),  # DP2
    (DENSE, 2, ParallelLayout(tensor_parallel_size=2)),
    (DENSE, 2, ParallelLayout(tensor_parallel_size=2, sequence_parallel=True)),
    (DENSE, 2, ParallelLayout(pipeline_parallel_size=2)),
    (DENSE, 2, ParallelLayout(pipeline_parallel_size=2, virtual_pipeline_parallel_size=2)),
    (DENSE, 4, ParallelLayout(tensor_parallel_size=2, sequence_parallel=True, pipeline_parallel_size=2)),
    (MOE, 2, ParallelLayout()),  # DP2 (= EP1 with expert-DP 2)
    (MOE, 2, ParallelLayout(tensor_parallel_size=2, sequence_parallel=True)),
    (MOE, 2, ParallelLayout(pipeline_parallel_size=2)),
    (MOE, 2, ParallelLayout(pipeline_parallel_size=2, virtual_pipeline_parallel_size=2)),
    (MOE, 2, ParallelLayout(expert_parallel_size=2)),
    (MOE, 4, ParallelLayout(tensor_parallel_size=2, sequence_parallel=True, expert_parallel_size=2)),
    (MOE, 2, ParallelLayout(
        tensor_parallel_size=2, sequence_parallel=True, expert_parallel_size=2,
        expert_tensor_parallel_size=1)),
    (MOE, 4, ParallelLayout(pipeline_parallel_size=2, expert_parallel_size=2)),
    # MoMa 2t2i with auxiliary routers; whole experts on every rank (expert-TP 1).
    (MOMA, 2, ParallelLayout()),  # DP2
    (MOMA, 2, ParallelLayout(tensor_parallel_size=2, expert_tensor_parallel_size=1)),
    (MOMA, 2, ParallelLayout(tensor_parallel_size=2, sequence_parallel=True,
                             expert_tensor_parallel_size=1)),
    (MOMA, 2, ParallelLayout(pipeline_parallel_size=2)),
    (MOMA, 2, ParallelLayout(expert_parallel_size=2)),
    (MOMA, 4, ParallelLayout(tensor_parallel_size=2, expert_parallel_size=2,
                             expert_tensor_parallel_size=1)),
    (MOMA, 4, ParallelLayout(tensor_parallel_size=2, sequence_parallel=True, expert_parallel_size=2,
                             expert_tensor_parallel_size=1)),
    (MOMA, 4, ParallelLayout(pipeline_parallel_size=2, expert_parallel_size=2)),
    # Expert tensor parallelism: each expert's linears split over the expert-TP group, its rows
    # gathered there before the experts and reduce-scattered after them.
    (MOMA, 2, ParallelLayout(tensor_parallel_size=2, sequence_parallel=True,
                             expert_tensor_parallel_size=2)),
    (MOMA, 2, ParallelLayout(tensor_parallel_size=2, expert_tensor_parallel_size=2)),
    (MOMA, 2, ParallelLayout(expert_tensor_parallel_size=2)),  # expert-TP over the DP ranks
    (MOMA, 4, ParallelLayout(tensor_parallel_size=2, sequence_parallel=True, expert_parallel_size=2,
                             expert_tensor_parallel_size=2)),
    # Grouped-GEMM experts (GroupedExpertMLP) split over expert-TP and spread over EP.
    (MOMA_GROUPED, 2, ParallelLayout(tensor_parallel_size=2, sequence_parallel=True,
                                     expert_tensor_parallel_size=2)),
    (MOMA_GROUPED, 4, ParallelLayout(tensor_parallel_size=2, sequence_parallel=True,
                                     expert_parallel_size=2, expert_tensor_parallel_size=2)),
    # Token choice inside each group, with Megatron's load-balancing loss.
    (MOMA_TOKEN_CHOICE, 2, ParallelLayout(expert_parallel_size=2)),
    (MOMA_TOKEN_CHOICE, 4, ParallelLayout(tensor_parallel_size=2, sequence_parallel=True,
                                          expert_parallel_size=2, expert_tensor_parallel_size=1)),
    (MOMA_TOKEN_CHOICE, 4, ParallelLayout(tensor_parallel_size=2, sequence_parallel=True,
                                          expert_parallel_size=2, expert_tensor_parallel_size=2)),
    # MoT: every non-embedding weight per modality, global attention.
    (MOT, 2, ParallelLayout()),  # DP2
    (MOT, 2, ParallelLayout(tensor_parallel_size=2)),
    (MOT, 2, ParallelLayout(tensor_parallel_size=2, sequence_parallel=True)),
    (MOT, 2, ParallelLayout(pipeline_parallel_size=2)),
    (MOT, 2, ParallelLayout(pipeline_parallel_size=2, virtual_pipeline_parallel_size=2)),
    (MOT_POST_NORM, 2, ParallelLayout(tensor_parallel_size=2, sequence_parallel=True)),
    # MoT whose per-modality FFNs are MoMa groups.
    (MOT_MOMA, 2, ParallelLayout(expert_parallel_size=2)),
    (MOT_MOMA, 4, ParallelLayout(tensor_parallel_size=2, sequence_parallel=True, expert_parallel_size=2,
                                 expert_tensor_parallel_size=1)),
    # Mixture-of-Depths on alternating layers, over dense, MoMa and MoT layers.
    (MOD, 2, ParallelLayout()),  # DP2
    (MOD, 2, ParallelLayout(tensor_parallel_size=2)),
    (MOD, 2, ParallelLayout(tensor_parallel_size=2, sequence_parallel=True)),
    (MOD, 2, ParallelLayout(pipeline_parallel_size=2)),
    (MOD_MOMA, 2, ParallelLayout(expert_parallel_size=2)),
    (MOD_MOMA, 4, ParallelLayout(tensor_parallel_size=2, sequence_parallel=True, expert_parallel_size=2,
                                 expert_tensor_parallel_size=1)),
    (MOD_MOT, 2, ParallelLayout(tensor_parallel_size=2, sequence_parallel=True)),
]


def _case_id(case):
    model, world_size, layout = case
    kind = "moe" if model.num_experts else "dense"
    if model.mot:
        kind = f"mot-{model.mot.norm_placement}" + ("+moma" if model.moma else "")
    elif model.moma:
        kind = f"moma-{model.moma.routing.replace('_', '-')}" + ("-grouped" if model.moe_grouped_gemm else "")
    if model.mod:
        kind = f"mod+{kind}"
    name = layout.name if layout.name != "ws1" else "dp2"
    return f"{kind}-{name}-ws{world_size}"


@functools.lru_cache(maxsize=None)
def reference_run(model, spec) -> gpt_runs.RunResult:
    return run_on_ranks(gpt_runs.train, 1, model, ParallelLayout(), spec, timeout=120)[0]


def run_with_equal_step_metrics(model, world_size, layout, spec):
    """Run the layout and its world-size-1 reference; assert every step's loss and grad norm
    agree. Returns (reference result, the layout's per-rank results)."""
    reference = reference_run(model, spec)
    results = run_on_ranks(gpt_runs.train, world_size, model, layout, spec, timeout=240)
    last_stage_losses = [r.losses for r in results if r.losses]
    assert last_stage_losses, "no rank reported a loss"
    for losses in last_stage_losses[1:]:
        assert losses == pytest.approx(last_stage_losses[0], rel=0, abs=0)
    torch.testing.assert_close(last_stage_losses[0], reference.losses, **LOSS_TOLERANCE)
    for result in results:
        torch.testing.assert_close(result.grad_norms, reference.grad_norms, **GRAD_NORM_TOLERANCE)
    return reference, results


def gradients_from_first_step(params_after_first_step, lr):
    return {
        key: (gpt_runs.global_initial_value(key, tuple(value.shape)) - value) / lr
        for key, value in params_after_first_step.items()
    }


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_gradients_equal_world_size_1(case):
    reference, results = run_with_equal_step_metrics(*case, SGD)
    expected = gradients_from_first_step(
        gpt_runs.assemble_global([reference.params_after_first_step]), SGD.lr
    )
    actual = gradients_from_first_step(
        gpt_runs.assemble_global([r.params_after_first_step for r in results]), SGD.lr
    )
    assert actual.keys() == expected.keys()
    for key in expected:
        assert expected[key].abs().max() > 0, f"{key}: reference gradient is zero, nothing compared"
        torch.testing.assert_close(actual[key], expected[key], **GRAD_TOLERANCE, msg=key)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_distributed_optimizer_equals_world_size_1(case):
    reference, results = run_with_equal_step_metrics(*case, ADAM)
    expected = gpt_runs.assemble_global([reference.params_at_end])
    actual = gpt_runs.assemble_global([r.params_at_end for r in results])
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], **PARAM_TOLERANCE, msg=key)


SGD_MICRO_BATCH_2 = gpt_runs.TrainSpec(optimizer="sgd", lr=0.5, micro_batch_size=2,
                                      global_batch_size=4, steps=2)
CASES_MICRO_BATCH_2 = [
    # Two sequences per micro-batch: MoMa's expert choice and MoD's top-k take the micro-batch as
    # their scope (MoD pads each sequence's chosen tokens to the longest), and under DP each rank
    # holds the same micro-batches as world size 1.
    (MOD, 2, ParallelLayout()),  # DP2
    (MOD_MOT, 2, ParallelLayout(tensor_parallel_size=2, sequence_parallel=True)),
    (MOD_MOMA, 2, ParallelLayout(tensor_parallel_size=2, sequence_parallel=True,
                                 expert_tensor_parallel_size=1)),
    (MOMA, 2, ParallelLayout(tensor_parallel_size=2, expert_tensor_parallel_size=2)),
]


@pytest.mark.parametrize("case", CASES_MICRO_BATCH_2, ids=_case_id)
def test_gradients_equal_world_size_1_at_micro_batch_size_2(case):
    reference, results = run_with_equal_step_metrics(*case, SGD_MICRO_BATCH_2)
    lr = SGD_MICRO_BATCH_2.lr
    expected = gradients_from_first_step(
        gpt_runs.assemble_global([reference.params_after_first_step]), lr)
    actual = gradients_from_first_step(
        gpt_runs.assemble_global([r.params_after_first_step for r in results]), lr)
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], **GRAD_TOLERANCE, msg=key)


def test_reference_is_sensitive_to_the_weights():
    """Guard against a comparison that cannot fail: another seed gives other losses and grads."""
    reference = reference_run(DENSE, SGD)
    other = run_on_ranks(gpt_runs.train, 1, DENSE, ParallelLayout(),
                         gpt_runs.TrainSpec(optimizer="sgd", lr=0.5, seed=SGD.seed + 1))[0]
    assert abs(other.losses[0] - reference.losses[0]) > 1e-3
