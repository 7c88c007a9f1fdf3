"""GPU checks (marked `gpu`, skipped without CUDA): layers on the GPU against the CPU, FP8 expert
GEMMs against bf16 (torch-native and Transformer Engine), the TE specs with the real TE.

Every comparison here is between two runs of the same thing:
- a layer (same spec, same weights, same inputs) run on the CPU in fp32 in a separate process
  with CUDA hidden (the CPU path the rest of the suite checks against pure-torch references of
  docs/layers.md), and on the GPU: in fp32 where routing decides (expert choice must pick the same
  tokens: tolerance 1e-4), in bf16 where nothing is discrete (tolerance 3e-2 for the output,
  the input gradient and every parameter gradient; the same comparison with the CPU's own bf16
  in place of the GPU measured at most 0.012);
- FP8 expert GEMMs against the same experts in bf16, with the bounds of tests/test_fp8_experts.py
  (measured there on CPU; the GPU kernels accumulate in fp32 as the CPU emulation does).
Errors are relative Frobenius errors. The CUDA dispatch kernels themselves are compared with the
CPU ones in tests/test_ops_dispatch.py.

The CPU reference process: python tests/test_gpu.py CASE OUTPUT (with CUDA_VISIBLE_DEVICES="").
"""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from megatron_moma.config import (
    ExpertFp8Options,
    ModalityTransformerConfig,
    MoMaOptions,
    MoTOptions,
)
from megatron_moma.modality import ModalityIndex, ModalityLayout
from megatron_moma.modality.context import ModalityContext, attach_context

TESTS = os.path.dirname(os.path.abspath(__file__))
REPOSITORY = os.path.dirname(TESTS)
SEQ, BATCH, HIDDEN, HEADS, FFN = 32, 2, 64, 4, 128
LAYOUT = ModalityLayout.text_and_image(64, 127)
CASES = {
    # name: (option groups and flags, GPU dtype)
    "moma_2t2i": (dict(moma=MoMaOptions(experts_per_modality=(2, 2))), torch.float32),
    "moma_2t2i_grouped": (dict(moma=MoMaOptions(experts_per_modality=(2, 2)),
                               moe_grouped_gemm=True), torch.float32),
    "moma_1t1i": (dict(moma=MoMaOptions(experts_per_modality=(1, 1))), torch.bfloat16),
    "moma_1t1i_grouped": (dict(moma=MoMaOptions(experts_per_modality=(1, 1)),
                               moe_grouped_gemm=True), torch.bfloat16),
    "mot": (dict(mot=MoTOptions(qk_layernorm=True)), torch.bfloat16),
    "mot+moma_1t1i": (dict(mot=MoTOptions(), moma=MoMaOptions(experts_per_modality=(1, 1))),
                      torch.bfloat16),
}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def relative_error(actual, expected) -> float:
    return float((actual.double().cpu() - expected.double().cpu()).norm()
                 / expected.double().cpu().norm())


def layer_config(case: str, dtype: torch.dtype, **changes) -> ModalityTransformerConfig:
    options = {**CASES[case][0], **changes}
    return ModalityTransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=FFN,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        normalization="RMSNorm", hidden_dropout=0.0, attention_dropout=0.0,
        bf16=dtype == torch.bfloat16, params_dtype=dtype,
        use_cpu_initialization=not torch.cuda.is_available(), modality_layout=LAYOUT,
        **options)


def build_layer(case: str, dtype: torch.dtype, use_te=False):
    """One transformer layer of `case` with its modality context (local spec unless use_te)."""
    from megatron.core.transformer.spec_utils import build_module

    from megatron_moma.models import get_layer_spec

    config = layer_config(case, dtype)
    layer = build_module(get_layer_spec(config, use_te=use_te), config=config, layer_number=1)
    context = ModalityContext()
    attach_context(layer, context)
    return layer, context


def layer_inputs():
    generator = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(SEQ, BATCH, HIDDEN, generator=generator),
                modality_ids=(torch.rand(BATCH, SEQ, generator=generator) < 0.5).long(),
                grad=torch.randn(SEQ, BATCH, HIDDEN, generator=generator))


def run_layer(layer, context, inputs, device, dtype):
    """-> dict of output, input grad and each parameter's grad (fp32, CPU)."""
    context.index = ModalityIndex.from_batch(inputs["modality_ids"].to(device),
                                             LAYOUT.num_modalities)
    x = inputs["x"].detach().to(device, dtype).clone().requires_grad_(True)
    output, _ = layer(x, attention_mask=None)
    output.backward(inputs["grad"].to(device, dtype))
    results = {"output": output, "input grad": x.grad}
    results.update({name: p.grad for name, p in layer.named_parameters()})
    return {name: t.detach().float().cpu() for name, t in results.items()}


def _cpu_reference(case: str):
    """Rank 0 of a CPU run: the layer's weights, the inputs and the fp32 results."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(0)
    layer, context = build_layer(case, torch.float32)
    for param in layer.parameters():  # away from Megatron's tiny init, so routing matters
        torch.nn.init.normal_(param, mean=1.0 if param.dim() == 1 else 0.0, std=0.1)
    inputs = layer_inputs()
    return layer.state_dict(), inputs, run_layer(layer, context, inputs, "cpu", torch.float32)


def cpu_reference(case: str, tmp_path):
    """Run `_cpu_reference` in a fresh process that sees no GPU (megatron on CPU with gloo)."""
    output = tmp_path / f"{case}.pt"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([REPOSITORY, os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, __file__, case, str(output)], env=env, check=True,
                   timeout=600)
    return torch.load(output, weights_only=False)


@pytest.fixture(scope="module")
def megatron_on_gpu(tmp_path_factory):
    """megatron-core's parallel state on one GPU, in this process (a forked child could not
    use CUDA once the parent has touched it)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 comparisons mean fp32 GEMMs
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def te_available() -> bool:
    from megatron_moma.specs.backend import transformer_engine_available

    return transformer_engine_available()


needs_te = pytest.mark.skipif("not te_available()", reason="transformer_engine does not import")


# ------------------------------------------------------------------------ layers: GPU vs CPU
@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_layer_on_gpu_matches_the_cpu(megatron_on_gpu, tmp_path, case):
    state, inputs, expected = cpu_reference(case, tmp_path)
    dtype = CASES[case][1]
    layer, context = build_layer(case, dtype)
    layer.load_state_dict(state)
    actual = run_layer(layer, context, inputs, "cuda", dtype)
    assert actual.keys() == expected.keys()
    errors = {name: relative_error(actual[name], expected[name])
              for name in expected if expected[name].any()}
    print(case, {name: f"{error:.2e}" for name, error in errors.items()})
    assert max(errors.values()) < TOLERANCE[dtype], errors
    for name in expected.keys() - errors.keys():  # no tokens reached it on the CPU either
        assert not actual[name].any(), name


# ------------------------------------------------------------------------ FP8, torch-native
@pytest.mark.gpu
@pytest.mark.parametrize("options", [ExpertFp8Options(f, r) for f in ("e4m3", "hybrid")
                                     for r in ("tensorwise", "rowwise")],
                         ids=lambda o: f"{o.format}-{o.recipe}")
def test_torch_fp8_grouped_linear_on_gpu(options):
    """The CPU test's bounds (output 0.01-0.05, input grad 0.01-0.05 e4m3 / 0.04-0.08 hybrid,
    weight grad < 5e-3), with the GPU's FP8 kernels."""
    from test_fp8_experts import COUNTS, grouped_linear_problem, run_grouped_linear

    x, weights, grad = (t.cuda() if torch.is_tensor(t) else [w.cuda() for w in t]
                        for t in grouped_linear_problem(0))
    y, dx, dw = run_grouped_linear(x, weights, grad, COUNTS, options)
    ref_y, ref_dx, ref_dw = run_grouped_linear(x, weights, grad, COUNTS, "fp64")
    errors = (relative_error(y, ref_y), relative_error(dx, ref_dx),
              max(relative_error(a, b) for a, b, count in zip(dw, ref_dw, COUNTS) if count))
    print(options, errors)
    assert 0.01 < errors[0] < 0.05
    assert (0.01 < errors[1] < 0.05) if options.format == "e4m3" else (0.04 < errors[1] < 0.08)
    assert errors[2] < 5e-3


@pytest.mark.gpu
def test_grouped_fp8_kernel_matches_per_expert_scaled_mm():
    """On Hopper the forward runs torch._scaled_grouped_mm; it must equal one torch._scaled_mm
    per expert on the same FP8 operands."""
    from megatron_moma.layers import fp8

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("torch's grouped FP8 kernel runs on compute capability 9.x")
    counts, k, n = [32, 0, 48, 16], 128, 96
    generator = torch.Generator().manual_seed(0)
    a_q, a_scale = fp8.quantize(torch.randn(sum(counts), k, generator=generator).cuda(),
                                torch.float8_e4m3fn, rowwise=True)
    b_q, b_scale = fp8.quantize(torch.randn(len(counts), n, k, generator=generator).cuda(),
                                torch.float8_e4m3fn, rowwise=True)
    assert fp8._grouped_kernel_applies(a_q, torch.bfloat16, counts)
    grouped = fp8.scaled_grouped_matmul(a_q, a_scale, b_q, b_scale, counts, True, torch.bfloat16)
    per_expert, start = [], 0
    for expert, count in enumerate(counts):
        per_expert.append(torch._scaled_mm(
            a_q[start:start + count], b_q[expert].t(), scale_a=a_scale[start:start + count],
            scale_b=b_scale[expert].reshape(1, n), out_dtype=torch.bfloat16))
        start += count
    torch.testing.assert_close(grouped, torch.cat(per_expert), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("options", [ExpertFp8Options("e4m3", "tensorwise"),
                                     ExpertFp8Options("hybrid", "rowwise")],
                         ids=lambda o: f"{o.format}-{o.recipe}")
def test_torch_fp8_expert_mlp_on_gpu_against_bf16(megatron_on_gpu, options):
    """The CPU test's bounds: output < 0.10, input grad < 0.15, weight grads < 0.12."""
    from test_fp8_experts import _build_experts, _inputs, _run_experts

    bf16 = _build_experts(True).bfloat16().cuda()
    in_fp8 = _build_experts(True, options).bfloat16().cuda()
    in_fp8.load_state_dict(bf16.state_dict())
    inputs = [t.cuda() for t in _inputs(0, torch.bfloat16)]
    (out, dx, dw), (ref_out, ref_dx, ref_dw) = (_run_experts(m, *inputs) for m in (in_fp8, bf16))
    errors = (relative_error(out, ref_out), relative_error(dx, ref_dx),
              max(relative_error(dw[name], ref_dw[name]) for name in dw if ref_dw[name].any()))
    print(options, errors)
    assert 0.01 < errors[0] < 0.10 and 0.01 < errors[1] < 0.15 and errors[2] < 0.12


@pytest.mark.gpu
def test_this_gpu_can_run_torch_fp8():
    from megatron_moma.layers import fp8

    capability = torch.cuda.get_device_capability()
    if capability < (8, 9):
        pytest.skip(f"compute capability {capability}: FP8 is refused here, as it should be")
    assert fp8.missing_torch_ops() == []
    assert fp8.fp8_support_problem("rowwise", False, "cuda", capability) is None


# ------------------------------------------------------------------------ Transformer Engine
@pytest.mark.gpu
@needs_te
def test_te_specs_name_the_real_te_classes():
    from megatron_moma.models import get_layer_spec

    def names(spec):
        return spec.__name__ if isinstance(spec, type) else type(spec).__name__

    dense = get_layer_spec(layer_config("moma_2t2i", torch.bfloat16, moma=None))
    attention = dense.submodules.self_attention.submodules
    assert names(attention.linear_qkv) == "TELayerNormColumnParallelLinear"
    assert names(attention.core_attention) == "TEDotProductAttention"
    assert names(attention.linear_proj) == "TERowParallelLinear"
    moma = get_layer_spec(layer_config("moma_2t2i", torch.bfloat16))
    experts = moma.submodules.mlp.submodules.experts
    assert names(experts.module) == "SequentialMLP"
    assert names(experts.submodules.linear_fc1) == "TEColumnParallelLinear"
    assert names(moma.submodules.pre_mlp_layernorm) == "TENorm"
    grouped = get_layer_spec(layer_config("moma_2t2i_grouped", torch.bfloat16))
    experts = grouped.submodules.mlp.submodules.experts
    assert names(experts.module) == "TEGroupedMLP"
    assert names(experts.submodules.linear_fc1) == "TEColumnParallelGroupedLinear"
    mot = get_layer_spec(layer_config("mot", torch.bfloat16))
    assert names(mot.submodules.self_attention.submodules.core_attention) == "TEDotProductAttention"


@pytest.mark.gpu
@needs_te
def test_te_and_local_moma_layers_save_the_same_checkpoint_keys(megatron_on_gpu):
    keys = {}
    for use_te in (True, False):
        layer, _ = build_layer("moma_2t2i", torch.bfloat16, use_te=use_te)
        keys[use_te] = {k for k in layer.sharded_state_dict() if not k.endswith("_extra_state")}
    assert keys[True] == keys[False], keys[True] ^ keys[False]


@pytest.mark.gpu
@needs_te
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
@pytest.mark.parametrize("grouped", [True, False], ids=["TEGroupedMLP", "SequentialMLP"])
def test_te_fp8_experts_against_bf16(megatron_on_gpu, recipe, grouped):
    """MoMa's TE experts under megatron-core's FP8 (hybrid; rows padded to 16 per expert by
    megatron-core) against the same experts in bf16: the torch-native path's bounds."""
    from megatron.core.fp8_utils import get_fp8_context
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.spec_utils import build_module
    from test_fp8_experts import EXPERTS, MODULE_COUNTS, _expert_config, _inputs

    from megatron_moma.specs.backend import expert_spec

    def build(**fp8_fields):
        config = _expert_config(bf16=True, params_dtype=torch.bfloat16, moe_grouped_gemm=grouped,
                                use_cpu_initialization=False, **fp8_fields)
        torch.manual_seed(0)
        module = build_module(expert_spec(True, grouped, None), EXPERTS, config,
                              pg_collection=get_default_pg_collection()).cuda()
        return module, config

    bf16, _ = build()
    in_fp8, config = build(fp8="hybrid", fp8_recipe=recipe)
    for param in bf16.parameters():
        torch.nn.init.normal_(param, std=0.2)
    in_fp8.load_state_dict(bf16.state_dict(), strict=False)  # TE's _extra_state differs
    weights = dict(bf16.named_parameters())
    assert all(torch.equal(p, weights[name]) for name, p in in_fp8.named_parameters())
    rows, probs, grad = (t.cuda() for t in _inputs(0, torch.bfloat16))

    def run(module, context):
        x = rows.clone().requires_grad_(True)
        with context:
            output, _ = module(x, torch.tensor(MODULE_COUNTS), probs)
        output.backward(grad)
        grads = {name: p.grad.clone() for name, p in module.named_parameters()}
        module.zero_grad()
        return output.detach(), x.grad, grads

    for _ in range(3):  # delayed scaling takes its scales from earlier steps' amax
        result = run(in_fp8, get_fp8_context(config))
    reference = run(bf16, torch.enable_grad())
    errors = (relative_error(result[0], reference[0]), relative_error(result[1], reference[1]),
              max(relative_error(result[2][n], reference[2][n]) for n in reference[2]
                  if reference[2][n].any()))
    print(recipe, "grouped" if grouped else "sequential", errors)
    assert 0.01 < errors[0] < 0.10 and 0.01 < errors[1] < 0.15 and errors[2] < 0.12


# ------------------------------------------------------------------------ the trainer on a GPU
TRAINER_ARCHITECTURES = {
    "dense": ["--architecture", "dense"],
    "moma": ["--architecture", "moma", "--moma-experts-per-modality", "2", "2"],
    "moma-token-choice": ["--architecture", "moma", "--moma-experts-per-modality", "2", "2",
                          "--moma-routing", "token_choice"],
    "mot": ["--architecture", "mot"],
    "mot+moma": ["--architecture", "mot+moma", "--moma-experts-per-modality", "2", "2"],
    "moma+mod": ["--architecture", "moma", "--moma-experts-per-modality", "2", "2", "--mod"],
    "mot+mod": ["--architecture", "mot", "--mod"],
}


@pytest.mark.gpu
@pytest.mark.parametrize("architecture", list(TRAINER_ARCHITECTURES))
def test_pretrain_moma_trains_on_one_gpu(data_path, tmp_path, architecture):
    """A few iterations of the real command on one GPU (NCCL): the auxiliary losses' backward,
    the loss and statistics collectives, evaluation and the SIGTERM check all run on CUDA
    tensors; the losses are finite and every step is logged."""
    from megatron_moma.testing.trainer_runs import TINY_TRAINER_FLAGS, tensorboard_scalars

    flags = [flag if flag != "cpu" else "cuda" for flag in TINY_TRAINER_FLAGS]
    argv = flags + TRAINER_ARCHITECTURES[architecture] + [
        "--data-path", data_path, "--train-iters", "3", "--global-batch-size", "4",
        "--lr", "1e-3", "--eval-interval", "3", "--eval-iters", "1", "--bf16",
        "--exit-signal-handler", "--tensorboard-dir", str(tmp_path / "tb"),
        "--save", str(tmp_path / "ckpt")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPOSITORY, os.environ.get("PYTHONPATH", "")]),
               CUDA_DEVICE_MAX_CONNECTIONS="1")
    completed = subprocess.run([sys.executable, "-m", "megatron_moma.training.pretrain_moma", *argv],
                               env=env, timeout=600, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    losses = tensorboard_scalars(str(tmp_path / "tb"), "lm loss")
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values()), losses
    assert math.isfinite(tensorboard_scalars(str(tmp_path / "tb"), "lm loss validation")[3])


if __name__ == "__main__":
    from megatron_moma.testing.multiprocess import run_on_ranks

    torch.save(run_on_ranks(_cpu_reference, 1, sys.argv[1], timeout=600)[0], sys.argv[2])
