"""SDPACoreAttention (torch's scaled_dot_product_attention) equals megatron-core's local
DotProductAttention, the reference: on the module alone (fp32, grouped-query attention, causal
and explicit masks, forward and backward), and in whole models (dense, MoMa, MoT, MoD) under
tensor and sequence parallelism against the world-size-1 model on DotProductAttention.
"""

import dataclasses
import functools

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnBackend, AttnMaskType

from megatron_moma.config import MoDOptions, MoMaOptions, MoTOptions
from megatron_moma.layers.sdpa_attention import SDPACoreAttention
from megatron_moma.parallel.layout import ParallelLayout
from megatron_moma.testing import gpt_runs
from megatron_moma.testing.multiprocess import run_on_ranks

HEADS, GROUPS, HEAD_DIM, SEQ, BATCH = 4, 2, 8, 12, 2
CPU_BACKENDS = (AttnBackend.auto, AttnBackend.flash, AttnBackend.unfused)
# fp32 softmax and matmuls summed in another order: observed differences are ~1e-7.
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def _padding_mask() -> torch.Tensor:
    """Megatron's convention, [b, 1, s, s], True = masked: causal, and in the second sequence
    the first 3 keys are padding (hidden from the queries after them, never a whole row)."""
    mask = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1).expand(BATCH, 1, SEQ, SEQ).clone()
    mask[1, :, 3:, :3] = True
    return mask


def _attention_outputs(backend: AttnBackend, use_mask: bool):
    """On a world-size-1 rank: (output, dq, dk, dv) of DotProductAttention and SDPACoreAttention
    on the same random query [s, b, heads, d], key and value [s, b, groups, d]."""
    gpt_runs.initialize(ParallelLayout(), gpt_runs.TrainSpec())
    config = gpt_runs.transformer_config(gpt_runs.TinyGPT(num_query_groups=GROUPS, num_attention_heads=HEADS,
                                                 hidden_size=HEADS * HEAD_DIM,
                                                 attention_backend=backend), ParallelLayout())
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(SEQ, BATCH, n, HEAD_DIM, generator=generator)
              for n in (HEADS, GROUPS, GROUPS)]
    mask = _padding_mask() if use_mask else None
    results = []
    for module_class in (DotProductAttention, SDPACoreAttention):
        module = module_class(config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                              attention_type="self")
        leaves = [t.clone().requires_grad_() for t in inputs]
        output = module(*leaves, mask)
        output.backward(torch.randn(output.shape, generator=torch.Generator().manual_seed(1)))
        results.append([output.detach()] + [t.grad for t in leaves])
    return results


@pytest.mark.parametrize("use_mask", [False, True], ids=["causal", "explicit-mask"])
@pytest.mark.parametrize("backend", CPU_BACKENDS, ids=lambda b: b.name)
def test_sdpa_equals_dot_product_attention(backend, use_mask):
    reference, sdpa = run_on_ranks(_attention_outputs, 1, backend, use_mask, timeout=60)[0]
    assert reference[0].shape == (SEQ, BATCH, HEADS * HEAD_DIM)
    for name, expected, actual in zip(("output", "dq", "dk", "dv"), reference, sdpa):
        assert expected.abs().max() > 0, name
        torch.testing.assert_close(actual, expected, **TOLERANCE, msg=name)


def _fused_on_cpu():
    gpt_runs.initialize(ParallelLayout(), gpt_runs.TrainSpec())
    config = gpt_runs.transformer_config(gpt_runs.TinyGPT(attention_backend=AttnBackend.fused),
                                         ParallelLayout())
    module = SDPACoreAttention(config, 1, AttnMaskType.causal, "self")
    query = torch.zeros(4, 1, 4, 8)
    try:
        module(query, query, query, None)
    except ValueError as error:
        return str(error)
    return None


def test_fused_backend_is_refused_on_cpu():
    message = run_on_ranks(_fused_on_cpu, 1, timeout=60)[0]
    assert message is not None and "CUDA only" in message and "auto, flash or unfused" in message


# -------------------------------------------------------------- whole models, TP and TP+SP
SGD = gpt_runs.TrainSpec(optimizer="sgd", lr=0.5, steps=2)
TP2 = ParallelLayout(tensor_parallel_size=2)
TP2_SP = ParallelLayout(tensor_parallel_size=2, sequence_parallel=True)
TP2_SP_ETP1 = ParallelLayout(tensor_parallel_size=2, sequence_parallel=True,
                             expert_tensor_parallel_size=1)
GQA = dict(num_query_groups=2)
MODEL_CASES = [
    ("dense-gqa-tp2", gpt_runs.TinyGPT(**GQA), TP2),
    ("dense-gqa-tp2-sp", gpt_runs.TinyGPT(**GQA), TP2_SP),
    ("moma-tp2-sp", gpt_runs.TinyGPT(moma=MoMaOptions(experts_per_modality=(2, 2)), **GQA),
     TP2_SP_ETP1),
    ("mot-tp2-sp", gpt_runs.TinyGPT(mot=MoTOptions(), **GQA), TP2_SP),
    ("mod-tp2-sp", gpt_runs.TinyGPT(mod=MoDOptions(), **GQA), TP2_SP),
]


@functools.lru_cache(maxsize=None)
def _local_reference(model: gpt_runs.TinyGPT) -> gpt_runs.RunResult:
    local = dataclasses.replace(model, attention_backend=AttnBackend.local)
    return run_on_ranks(gpt_runs.train, 1, local, ParallelLayout(), SGD, timeout=120)[0]


def _first_step_gradients(results):
    params = gpt_runs.assemble_global([r.params_after_first_step for r in results])
    return {key: (gpt_runs.global_initial_value(key, tuple(value.shape)) - value) / SGD.lr
            for key, value in params.items()}


@pytest.mark.parametrize("name, model, layout", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_sdpa_models_under_tp_equal_dot_product_attention_at_world_size_1(name, model, layout):
    assert model.attention_backend == AttnBackend.auto
    reference = _local_reference(model)
    results = run_on_ranks(gpt_runs.train, 2, model, layout, SGD, timeout=240)
    for result in results:
        torch.testing.assert_close(result.losses, reference.losses, rtol=1e-6, atol=2e-6)
        torch.testing.assert_close(result.grad_norms, reference.grad_norms, rtol=2e-5, atol=1e-6)
    expected, actual = _first_step_gradients([reference]), _first_step_gradients(results)
    assert actual.keys() == expected.keys()
    for key in expected:
        assert expected[key].abs().max() > 0, f"{key}: reference gradient is zero"
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-3, atol=2e-5, msg=key)
