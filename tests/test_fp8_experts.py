"""Grouped and FP8 expert GEMMs without Transformer Engine, on CPU.

torch runs its grouped matmul and its FP8 scaled matmul on CPU (emulated), so the numerics of
the torch-native path are checked here against independent references: per-expert fp64 matmuls
and a per-expert SwiGLU loop. FP8 is checked against bf16 within a stated relative error
(measured on CPU with these shapes and seeds, 3 seeds, see each test). The GPU runs of the same
checks (and of the grouped FP8 kernel, CUDA only) are in tests/test_gpu.py.
"""

import argparse

import pytest
import torch
import torch.nn.functional as F

from megatron_moma.config import ExpertFp8Options
from megatron_moma.layers import fp8
from megatron_moma.layers.expert_padding import ExpertPadding
from megatron_moma.layers.grouped_experts import GroupedLinear
from megatron_moma.testing.multiprocess import run_on_ranks

FORMATS_AND_RECIPES = [ExpertFp8Options(f, r) for f in ("e4m3", "hybrid")
                       for r in ("tensorwise", "rowwise")]
COUNTS = [48, 0, 80, 16]  # an expert without rows included


def relative_error(actual, expected) -> float:
    """Relative Frobenius error ||actual - expected|| / ||expected||, in fp64."""
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def per_expert_matmuls(x, weights, counts):
    """Reference of GroupedLinear: fp64 x[R_e] W_e^T, expert by expert."""
    outputs, start = [], 0
    for weight, count in zip(weights, counts):
        outputs.append(x[start:start + count] @ weight.t())
        start += count
    return torch.cat(outputs) if outputs else x.new_zeros(0, weights[0].shape[0])


def grouped_linear_problem(seed, counts=COUNTS, k=128, n=96, dtype=torch.bfloat16):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), k, generator=generator).to(dtype)
    weights = [(0.05 * torch.randn(n, k, generator=generator)).to(dtype) for _ in counts]
    grad = torch.randn(sum(counts), n, generator=generator).to(dtype)
    return x, weights, grad


def run_grouped_linear(x, weights, grad, counts, options):
    """-> (y, dx, [dW_e]) of GroupedLinear, or of the fp64 reference when options == 'fp64'."""
    if options == "fp64":
        x = x.double().requires_grad_(True)
        weights = [w.double().requires_grad_(True) for w in weights]
        y = per_expert_matmuls(x, weights, counts)
        y.backward(grad.double())
    else:
        x = x.clone().requires_grad_(True)
        weights = [w.clone().requires_grad_(True) for w in weights]
        y = GroupedLinear.apply(x, counts, options, *weights)
        y.backward(grad)
    return y.detach(), x.grad, [w.grad for w in weights]


# ------------------------------------------------------------------------ grouped GEMM
@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-6), (torch.bfloat16, 5e-3)])
def test_grouped_linear_matches_per_expert_matmuls(dtype, bound):
    """Measured relative error: fp32 2e-7, bf16 0.0017 (bf16 rounding of the outputs)."""
    x, weights, grad = grouped_linear_problem(0, dtype=dtype)
    y, dx, dw = run_grouped_linear(x, weights, grad, COUNTS, None)
    ref_y, ref_dx, ref_dw = run_grouped_linear(x, weights, grad, COUNTS, "fp64")
    assert y.dtype == dtype and relative_error(y, ref_y) < bound
    assert relative_error(dx, ref_dx) < bound
    for expert, (actual, expected) in enumerate(zip(dw, ref_dw)):
        if COUNTS[expert]:
            assert relative_error(actual, expected) < bound, expert
        else:
            assert torch.equal(actual, torch.zeros_like(actual)), "an expert without rows"


@pytest.mark.parametrize("options", [None, ExpertFp8Options("hybrid", "rowwise")],
                         ids=["bf16", "fp8"])
def test_grouped_linear_without_rows_gives_zero_weight_grads(options):
    """A group with no token of its modality on this rank: parameters stay in the graph."""
    x, weights, grad = grouped_linear_problem(0, counts=[0, 0])
    y, dx, dw = run_grouped_linear(x, weights, grad, [0, 0], options)
    assert y.shape == (0, 96) and dx.shape == (0, 128)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in dw)


# ------------------------------------------------------------------------ padding
def test_padding_round_trip():
    counts = [5, 0, 17, 16, 1]
    padding = ExpertPadding.plan(counts, 16, "cpu")
    assert padding.counts == [16, 0, 32, 16, 16] and padding.num_rows == 80
    rows = torch.randn(sum(counts), 8)
    padded = padding.pad(rows)
    starts = [0, 16, 16, 48, 64]
    for start, count, padded_count in zip(starts, counts, padding.counts):
        assert torch.equal(padded[start:start + count], rows[:count]), "rows out of place"
        assert not padded[start + count:start + padded_count].any(), "padding is not zero"
        rows = rows[count:]
    assert torch.equal(padding.unpad(padded), torch.cat([padded[s:s + c] for s, c in
                                                         zip(starts, counts)]))


@pytest.mark.parametrize("options", [None, ExpertFp8Options("hybrid", "rowwise")],
                         ids=["bf16", "fp8"])
def test_padded_gemm_equals_the_unpadded_one(options):
    """Zero padding rows change neither the real rows' outputs nor any gradient."""
    counts = [5, 0, 17, 3]
    x, weights, grad = grouped_linear_problem(1, counts=counts)
    padding = ExpertPadding.plan(counts, fp8.FP8_ROW_ALIGNMENT, "cpu")

    x_padded = x.clone().requires_grad_(True)
    w_padded = [w.clone().requires_grad_(True) for w in weights]
    y = padding.unpad(GroupedLinear.apply(padding.pad(x_padded), padding.counts, options,
                                          *w_padded))
    y.backward(grad)
    ref_y, ref_dx, ref_dw = run_grouped_linear(x, weights, grad, counts, options)
    # Same products, same per-row and per-channel scales: equal up to summation order.
    torch.testing.assert_close(y, ref_y, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(x_padded.grad, ref_dx, rtol=1e-2, atol=1e-3)
    for actual, expected in zip(w_padded, ref_dw):
        torch.testing.assert_close(actual.grad, expected, rtol=1e-2, atol=1e-3)


# ------------------------------------------------------------------------ FP8 numerics
@pytest.mark.parametrize("options", FORMATS_AND_RECIPES, ids=lambda o: f"{o.format}-{o.recipe}")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fp8_grouped_linear_against_fp64(options, seed):
    """One grouped GEMM, 4 experts, K=128, N=96, N(0,1) inputs, weights N(0, 0.05^2).

    Measured relative Frobenius error (seeds 0-2): output 0.036-0.038 (E4M3 inputs and
    weights), input gradient 0.035-0.038 with `e4m3` and 0.056-0.059 with `hybrid` (E5M2 output
    gradient), weight gradient 0.0017 (bf16, as without FP8). bf16 alone: 0.0017 everywhere.
    """
    x, weights, grad = grouped_linear_problem(seed)
    y, dx, dw = run_grouped_linear(x, weights, grad, COUNTS, options)
    ref_y, ref_dx, ref_dw = run_grouped_linear(x, weights, grad, COUNTS, "fp64")
    e4m3_dx = run_grouped_linear(x, weights, grad, COUNTS,
                                 ExpertFp8Options("e4m3", options.recipe))[1]
    assert 0.01 < relative_error(y, ref_y) < 0.05, "FP8 forward off (or not FP8 at all)"
    dx_error = relative_error(dx, ref_dx)
    if options.format == "e4m3":
        assert 0.01 < dx_error < 0.05
    else:  # E5M2 has one mantissa bit less than E4M3: its error is clearly larger
        assert 0.04 < dx_error < 0.08 and dx_error > 1.3 * relative_error(e4m3_dx, ref_dx)
    for expert, (actual, expected) in enumerate(zip(dw, ref_dw)):
        if COUNTS[expert]:
            assert relative_error(actual, expected) < 5e-3, "weight gradient is bf16"


def test_rowwise_scaling_keeps_small_rows_accurate():
    """Rows spanning 6 decades: one tensorwise scale flushes the small rows into E4M3's
    subnormals, one scale per row keeps every row at E4M3 precision."""
    x, weights, grad = grouped_linear_problem(3)
    x = (x.float() * torch.logspace(-6, 0, x.shape[0]).unsqueeze(1)).bfloat16()
    ref_y = run_grouped_linear(x, weights, grad, COUNTS, "fp64")[0]

    def worst_row_error(recipe):
        y = run_grouped_linear(x, weights, grad, COUNTS, ExpertFp8Options("e4m3", recipe))[0]
        errors = (y.double() - ref_y).norm(dim=1) / ref_y.norm(dim=1)
        return float(errors.max())

    assert worst_row_error("rowwise") < 0.1
    assert worst_row_error("tensorwise") > 0.3


def test_grouped_fp8_kernel_call_passes_torchs_checks():
    """The one-call Hopper kernel cannot run here; its arguments go through torch's own shape,
    stride, dtype and scale checks for it (its meta function), for both recipes."""
    counts, k, n = [32, 0, 16], 64, 48
    for rowwise in (True, False):
        a_q, a_scale = fp8.quantize(torch.randn(sum(counts), k, device="meta"),
                                    torch.float8_e4m3fn, rowwise)
        b_q, b_scale = fp8.quantize(torch.randn(len(counts), n, k, device="meta"),
                                    torch.float8_e4m3fn, rowwise)
        out = fp8.grouped_scaled_kernel(a_q, a_scale, b_q, b_scale, counts, torch.bfloat16)
        assert out.shape == (sum(counts), n) and out.dtype == torch.bfloat16
    row_major_weights = b_q.transpose(-2, -1).contiguous().transpose(-2, -1)  # [E, N, K] view
    with pytest.raises(RuntimeError, match="column major"):  # the checks do run
        fp8.grouped_scaled_kernel(a_q, a_scale, row_major_weights, b_scale, counts, torch.bfloat16)


# ------------------------------------------------------------------------ the expert module
HIDDEN, FFN, EXPERTS = 64, 96, 4
MODULE_COUNTS = [21, 0, 37, 9]


def _expert_config(**kwargs):
    from megatron.core.transformer import TransformerConfig

    base = dict(num_layers=1, hidden_size=HIDDEN, ffn_hidden_size=FFN, num_attention_heads=2,
                gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
                num_moe_experts=EXPERTS, use_cpu_initialization=True)
    base.update(kwargs)
    return TransformerConfig(**base)


def _build_experts(grouped: bool, fp8_options=None, seed=0, **config_kwargs):
    """An expert group as MoMa builds it (specs.backend.expert_spec), weights N(0, 0.2^2)."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.spec_utils import build_module

    from megatron_moma.specs.backend import expert_spec

    torch.manual_seed(seed)
    spec = expert_spec(False, grouped, fp8_options)
    module = build_module(spec, EXPERTS, _expert_config(**config_kwargs),
                          pg_collection=get_default_pg_collection())
    for param in module.parameters():
        torch.nn.init.normal_(param, std=0.2)
    return module


def _inputs(seed, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(sum(MODULE_COUNTS), HIDDEN, generator=generator).to(dtype)
    probs = torch.rand(sum(MODULE_COUNTS), generator=generator).to(dtype)
    grad = torch.randn(sum(MODULE_COUNTS), HIDDEN, generator=generator).to(dtype)
    return rows, probs, grad


def _run_experts(module, rows, probs, grad):
    """-> (output, rows grad, {parameter name: grad})."""
    rows = rows.clone().requires_grad_(True)
    output, bias = module(rows, torch.tensor(MODULE_COUNTS), probs)
    assert bias is None
    output.backward(grad)
    return (output.detach(), rows.grad,
            {name: p.grad.clone() for name, p in module.named_parameters()})


def reference_experts(rows, probs, module):
    """fp64 SwiGLU per expert, from the module's weights: probs * silu(x Wg) (x Wu) W2^T."""
    outputs, start = [], 0
    for expert, count in zip(module.local_experts, MODULE_COUNTS):
        x = rows[start:start + count]
        gate, up = (x @ expert.linear_fc1.weight.double().t()).chunk(2, dim=-1)
        hidden = F.silu(gate) * up * probs[start:start + count, None]
        outputs.append(hidden @ expert.linear_fc2.weight.double().t())
        start += count
    return torch.cat(outputs)


def _grouped_against_sequential_and_reference():
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel()
    rows, probs, grad = _inputs(1)
    grouped, sequential = _build_experts(True), _build_experts(False, seed=1)
    sequential.load_state_dict(grouped.state_dict())
    ours, megatrons = (_run_experts(m, rows, probs, grad) for m in (grouped, sequential))

    bf16 = _build_experts(True).bfloat16()
    bf16.load_state_dict(grouped.state_dict())
    rows_64 = rows.double().requires_grad_(True)
    reference = reference_experts(rows_64, probs.double(), grouped)
    reference.backward(grad.double())
    in_bf16 = _run_experts(bf16, rows.bfloat16(), probs.bfloat16(), grad.bfloat16())
    return ours, megatrons, in_bf16, (reference.detach(), rows_64.grad)


def test_grouped_experts_match_sequential_mlp_and_the_reference():
    """fp32: equal to megatron-core's SequentialMLP with the same weights (measured: identical
    on CPU). bf16: within 2% of the fp64 reference (measured 0.6% for output, input and weight
    gradients)."""
    ours, megatrons, in_bf16, reference = run_on_ranks(_grouped_against_sequential_and_reference,
                                                       1, timeout=120)[0]
    for actual, expected in zip(ours[:2], megatrons[:2]):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    assert ours[2].keys() == megatrons[2].keys()
    for name in ours[2]:
        torch.testing.assert_close(ours[2][name], megatrons[2][name], rtol=1e-5, atol=1e-6)
    assert relative_error(in_bf16[0], reference[0]) < 0.02
    assert relative_error(in_bf16[1], reference[1]) < 0.02
    for name, grad in in_bf16[2].items():
        if ours[2][name].any():
            assert relative_error(grad, ours[2][name]) < 0.02, name
        else:  # the expert without rows
            assert not grad.any(), name


def _checkpoint_round_trip(directory):
    from megatron.core import dist_checkpointing, parallel_state

    parallel_state.initialize_model_parallel()
    grouped = _build_experts(True, ExpertFp8Options("hybrid", "rowwise"), seed=0)
    sequential = _build_experts(False, seed=1)
    same_keys = grouped.sharded_state_dict().keys() == sequential.sharded_state_dict().keys()
    rows, probs, grad = _inputs(2)
    before = sequential(rows, torch.tensor(MODULE_COUNTS), probs)[0]
    dist_checkpointing.save(grouped.sharded_state_dict(), directory)
    sequential.load_state_dict(dist_checkpointing.load(
        sequential.sharded_state_dict(), directory))
    after = sequential(rows, torch.tensor(MODULE_COUNTS), probs)[0]
    loaded = dict(sequential.named_parameters())
    weights_equal = all(torch.equal(p, loaded[name]) for name, p in grouped.named_parameters())
    grouped.fp8_options = None  # the same weights in bf16 GEMMs: SequentialMLP's numbers
    expected = grouped(rows, torch.tensor(MODULE_COUNTS), probs)[0]
    return same_keys, weights_equal, before, after, expected


def test_checkpoint_saved_with_grouped_experts_loads_into_sequential_mlp(tmp_path):
    same_keys, weights_equal, before, after, expected = run_on_ranks(
        _checkpoint_round_trip, 1, str(tmp_path), timeout=120)[0]
    assert same_keys and weights_equal
    assert not torch.allclose(before, expected), "both started equal: nothing was loaded"
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-6)


def _fp8_experts_against_bf16(options):
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel()
    bf16 = _build_experts(True).bfloat16()
    in_fp8 = _build_experts(True, options).bfloat16()
    in_fp8.load_state_dict(bf16.state_dict())
    errors = []
    for seed in range(3):
        inputs = _inputs(seed, torch.bfloat16)
        (out, dx, dw), (ref_out, ref_dx, ref_dw) = (_run_experts(m, *inputs)
                                                     for m in (in_fp8, bf16))
        errors.append((relative_error(out, ref_out), relative_error(dx, ref_dx),
                       max(relative_error(dw[name], ref_dw[name]) for name in dw
                           if ref_dw[name].any())))
        in_fp8.zero_grad()
        bf16.zero_grad()
    return errors


@pytest.mark.parametrize("options", FORMATS_AND_RECIPES, ids=lambda o: f"{o.format}-{o.recipe}")
def test_fp8_expert_mlp_against_bf16(options):
    """The whole expert group (FP8 fc1, SwiGLU, FP8 fc2, rows padded to 16 per expert) against the
    same weights in bf16, hidden 64, FFN 96, weights N(0, 0.2^2), 3 seeds. Measured relative
    Frobenius error: output 0.059-0.065; input gradient 0.063-0.071 (e4m3), 0.087-0.098
    (hybrid); weight gradients (worst expert) 0.056-0.066 (e4m3), 0.071-0.088 (hybrid), through
    the FP8 forward's activations and FP8 input gradients (the weight GEMM itself is bf16)."""
    errors = run_on_ranks(_fp8_experts_against_bf16, 1, options, timeout=120)[0]
    for output_error, input_grad_error, weight_grad_error in errors:
        assert 0.01 < output_error < 0.10
        assert 0.01 < input_grad_error < 0.15
        assert weight_grad_error < 0.12


def _moma_model_runs():
    """A 2-layer MoMa 2t2i model built three ways from one set of weights: loss and gradients."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_moma.config import ModalityTransformerConfig, MoMaOptions
    from megatron_moma.models import build_gpt_model
    from megatron_moma.modality import ModalityLayout

    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 128, (2, 32), generator=generator)
    labels = torch.randint(0, 128, (2, 32), generator=generator)
    position_ids = torch.arange(32).expand(2, 32)
    results, state = {}, None
    for name, changes in [("sequential", {}), ("grouped", dict(moe_grouped_gemm=True)),
                          ("fp8", dict(expert_fp8=ExpertFp8Options("hybrid", "rowwise")))]:
        config = ModalityTransformerConfig(
            num_layers=2, hidden_size=HIDDEN, ffn_hidden_size=FFN, num_attention_heads=4,
            gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
            normalization="RMSNorm", hidden_dropout=0.0, attention_dropout=0.0,
            use_cpu_initialization=True, modality_layout=ModalityLayout.text_and_image(64, 127),
            moma=MoMaOptions(experts_per_modality=(2, 2)), **changes)
        model = build_gpt_model(config, vocab_size=128, max_sequence_length=32)
        if state is None:
            state = model.state_dict()
        model.load_state_dict(state)
        loss = model(tokens, position_ids, None, labels=labels).mean()
        loss.backward()
        results[name] = (float(loss), {n: p.grad.clone() for n, p in model.named_parameters()
                                       if p.grad is not None})
    return results


def test_moma_model_with_grouped_or_fp8_experts_trains_like_sequential_experts():
    """Same weights, same batch: grouped experts give SequentialMLP's loss and gradients; FP8
    experts (hybrid, rowwise) the loss within 1% (measured 6e-6 relative: with megatron-core's
    init the expert outputs are a small part of this 2-layer model's logits)."""
    results = run_on_ranks(_moma_model_runs, 1, timeout=120)[0]
    (loss, grads), (grouped_loss, grouped_grads) = results["sequential"], results["grouped"]
    assert grouped_loss == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == grouped_grads.keys()
    for name in grads:
        torch.testing.assert_close(grouped_grads[name], grads[name], rtol=1e-4, atol=1e-6,
                                   msg=name)
    assert results["fp8"][0] == pytest.approx(loss, rel=1e-2)
    assert results["fp8"][0] != loss, "FP8 changed nothing: the FP8 path did not run"


# ------------------------------------------------------------------------ configuration errors
@pytest.mark.parametrize("recipe, use_te, device, capability, message", [
    ("rowwise", False, "cpu", None, "needs a CUDA GPU"),
    ("delayed", False, "cuda", (9, 0), "needs Transformer Engine"),
    ("rowwise", True, "cuda", (9, 0), "Transformer Engine, which is used when it imports"),
    ("rowwise", False, "cuda", (8, 0), "needs compute capability 8.9 or newer; this GPU has 8.0"),
    ("tensorwise", False, "cuda", None, "no CUDA GPU is visible"),
    ("delayed", True, "cuda", (8, 6), "compute capability 8.9"),
    ("blockwise", True, "cuda", (8, 9), "compute capability 9.0"),
    ("mxfp8", True, "cuda", (9, 0), "compute capability 10.0"),
])
def test_fp8_support_problems_say_what_is_missing(recipe, use_te, device, capability, message):
    assert message in fp8.fp8_support_problem(recipe, use_te, device, capability)


@pytest.mark.parametrize("recipe, use_te, capability", [
    ("rowwise", False, (8, 9)), ("tensorwise", False, (9, 0)), ("delayed", True, (9, 0)),
    ("mxfp8", True, (10, 0)), ("blockwise", True, (9, 0)),
])
def test_fp8_support_on_capable_gpus(recipe, use_te, capability):
    assert fp8.fp8_support_problem(recipe, use_te, "cuda", capability) is None


def test_fp8_with_a_torch_lacking_the_ops_fails(monkeypatch):
    monkeypatch.setattr(fp8, "missing_torch_ops", lambda names=fp8.TORCH_FP8_OPS: ["_scaled_mm"])
    problem = fp8.fp8_support_problem("rowwise", False, "cuda", (9, 0))
    assert "need torch's ['_scaled_mm']" in problem


def test_fp8_options_refuse_te_recipes():
    with pytest.raises(ValueError, match="'delayed' \\(a Transformer Engine recipe\\)"):
        ExpertFp8Options("hybrid", "delayed")
    with pytest.raises(ValueError, match="format must be one of"):
        ExpertFp8Options("e5m2", "rowwise")


def _build_refused(grouped_kwargs, config_kwargs):
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel()
    try:
        _build_experts(True, **grouped_kwargs, **config_kwargs)
    except ValueError as error:
        return str(error)
    return None


@pytest.mark.parametrize("fp8_options, config_kwargs, message", [
    (None, dict(add_bias_linear=True), "does not support ['add_bias_linear']"),
    (ExpertFp8Options(), dict(hidden_size=72, num_attention_heads=2), "divisible by 16"),
])
def test_grouped_experts_refuse_what_they_do_not_implement(fp8_options, config_kwargs, message):
    error = run_on_ranks(_build_refused, 1, dict(fp8_options=fp8_options), config_kwargs,
                         timeout=120)[0]
    assert error is not None and message in error


# ------------------------------------------------------------------------ trainer flags
REQUIRED = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "32", "--train-iters", "10", "--lr", "1e-3", "--data-path", "data/x",
            "--architecture", "moma", "--disable-bias-linear", "--swiglu", "--bf16",
            "--moma-experts-per-modality", "2", "2"]
FP8_FLAGS = ["--fp8-format", "hybrid", "--fp8-recipe", "tensorwise", "--fp8-margin", "1",
             "--fp8-amax-history-len", "16", "--fp8-amax-compute-algo", "max"]


def _parsed(extra, device="cpu") -> argparse.Namespace:
    """Parsed flags, before the FP8 machine checks (this machine has no GPU)."""
    from megatron_moma.training import arguments

    args = arguments.build_parser().parse_args(REQUIRED + extra + ["--device", device])
    args.world_size = 1
    arguments._fill_defaults(args)
    return args


def test_fp8_flags_keep_megatron_lm_names_and_defaults():
    args = _parsed([])
    assert args.fp8_format is None and args.fp8_recipe == "delayed"
    assert (args.fp8_margin, args.fp8_amax_history_len, args.fp8_amax_compute_algo) == (
        0, 1, "most_recent")
    assert args.moe_grouped_gemm is False


def test_fp8_flags_become_megatron_core_fields_under_te(monkeypatch):
    from megatron.core.transformer import TransformerConfig

    from megatron_moma.specs import backend
    from megatron_moma.training.configs import fp8_fields

    monkeypatch.setattr(backend, "transformer_engine_available", lambda: True)
    fields = fp8_fields(_parsed(FP8_FLAGS))
    assert fields == dict(fp8="hybrid", fp8_recipe="tensorwise", fp8_margin=1,
                          fp8_amax_history_len=16, fp8_amax_compute_algo="max")
    # megatron-core takes them (a dense config: with experts it would need TE to construct).
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, **fields)
    assert (config.fp8, config.fp8_recipe, config.fp8_amax_history_len) == ("hybrid",
                                                                            "tensorwise", 16)


def test_fp8_flags_become_expert_fp8_without_te():
    from megatron_moma.modality import ModalityLayout
    from megatron_moma.specs import backend
    from megatron_moma.training.configs import transformer_config

    if backend.transformer_engine_available():
        pytest.skip("Transformer Engine imports here")
    config = transformer_config(_parsed(["--fp8-format", "e4m3", "--fp8-recipe", "rowwise",
                                         "--moe-grouped-gemm"]),
                                ModalityLayout.text_and_image(64, 127))
    assert config.expert_fp8 == ExpertFp8Options("e4m3", "rowwise")
    assert config.fp8 is None and config.moe_grouped_gemm


@pytest.mark.parametrize("extra, device, pretend, message", [
    (FP8_FLAGS, "cpu", {}, "needs a CUDA GPU"),
    (["--fp8-format", "hybrid"], "cuda", {"te": False}, "'delayed' needs Transformer Engine"),
    (["--fp8-format", "hybrid", "--fp8-recipe", "rowwise"], "cuda", {"te": True},
     "the torch-native path's"),
    (["--fp8-format", "hybrid", "--fp8-recipe", "rowwise", "--architecture", "dense"], "cuda",
     {"te": False, "gpu": True}, "covers MoMa expert GEMMs only"),
    (["--fp8-format", "hybrid", "--architecture", "mot"], "cuda", {"te": True, "gpu": True},
     "would change nothing"),
    (["--fp8-format", "hybrid", "--fp8-recipe", "rowwise", "--ffn-hidden-size", "200"], "cuda",
     {"te": False, "gpu": True}, "divisible by 16"),
])
def test_fp8_flags_that_cannot_run_are_refused(monkeypatch, extra, device, pretend, message):
    from megatron_moma.specs import backend
    from megatron_moma.training.arguments import ArgumentError, validate

    if "te" in pretend:
        monkeypatch.setattr(backend, "transformer_engine_available", lambda: pretend["te"])
    if pretend.get("gpu"):  # a capable GPU: the remaining checks are the flags' own
        monkeypatch.setattr(fp8, "fp8_support_problem", lambda *args: None)
    args = _parsed(extra, device)
    with pytest.raises(ArgumentError, match=message):
        validate(args)


def test_fp8_needs_bf16(monkeypatch):
    from megatron_moma.training.arguments import ArgumentError, validate

    monkeypatch.setattr(fp8, "fp8_support_problem", lambda *args: None)
    args = _parsed(["--fp8-format", "hybrid", "--fp8-recipe", "rowwise"], "cuda")
    args.bf16 = False
    with pytest.raises(ArgumentError, match="needs --bf16"):
        validate(args)
