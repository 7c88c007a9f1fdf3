"""MoT layer against an independent pure-torch reference of docs/layers.md §§6, 7, and
against Megatron's own dense layer when every modality has the dense layer's weights."""

import math

import pytest
import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_moma.config import ModalityTransformerConfig, MoTOptions
from megatron_moma.modality import ModalityIndex, ModalityLayout
from megatron_moma.modality.context import ModalityContext, attach_context
from megatron_moma.specs import get_mot_layer_spec
from megatron_moma.testing.multiprocess import run_on_ranks

HIDDEN, HEADS, FFN, SEQ, BATCH, EPS = 16, 4, 24, 10, 2, 1e-5
LAYOUT = ModalityLayout.text_and_image(50, 99)
NAMES = ("text", "image")


# ----------------------------------------------------------------------------- reference
def rms(x, weight):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight


def reference_mot_layer(x, modality_ids, params, options: MoTOptions):
    """x [s, b, h], modality_ids [s, b] -> [s, b, h], straight from docs/layers.md §6."""
    s, b, h = x.shape
    head_dim = h // HEADS

    def weight(component, name, untied_by):
        def per_token(modality):
            group = NAMES[modality] if options.is_untied(untied_by) else "shared"
            return params[f"{component}.{group}"]
        return per_token

    def per_token_linear(component, untied_by, inputs):
        w = weight(component, None, untied_by)
        out = [inputs[i, j] @ w(int(modality_ids[i, j])).t() for i in range(s) for j in range(b)]
        return torch.stack(out).view(s, b, -1)

    def per_token_norm(component, untied_by, inputs):
        w = weight(component, None, untied_by)
        out = [rms(inputs[i, j], w(int(modality_ids[i, j]))) for i in range(s) for j in range(b)]
        return torch.stack(out).view(inputs.shape)

    pre = options.norm_placement == "pre"
    attn_in = per_token_norm("input_layernorm.weight", "norms", x) if pre else x
    q = per_token_linear("self_attention.linear_q.weight", "attention", attn_in)
    k = per_token_linear("self_attention.linear_k.weight", "attention", attn_in)
    v = per_token_linear("self_attention.linear_v.weight", "attention", attn_in)
    q, k, v = (t.view(s, b, HEADS, head_dim) for t in (q, k, v))
    if options.qk_layernorm:
        q = per_token_norm("self_attention.q_layernorm.weight", "attention", q)
        k = per_token_norm("self_attention.k_layernorm.weight", "attention", k)
    scores = torch.einsum("ibnd,jbnd->bnij", q, k) / math.sqrt(head_dim)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    context = torch.einsum("bnij,jbnd->ibnd", probs, v).reshape(s, b, h)
    attn_out = per_token_linear("self_attention.linear_proj.weight", "attention", context)
    if not pre:
        attn_out = per_token_norm("self_attention.post_norm.weight", "norms", attn_out)
    hidden = x + attn_out
    ffn_in = per_token_norm("pre_mlp_layernorm.weight", "norms", hidden) if pre else hidden
    gate = per_token_linear("mlp.linear_gate.weight", "ffn", ffn_in)
    up = per_token_linear("mlp.linear_up.weight", "ffn", ffn_in)
    ffn_out = per_token_linear("mlp.linear_down.weight", "ffn", F.silu(gate) * up)
    if not pre:
        ffn_out = per_token_norm("mlp.post_norm.weight", "norms", ffn_out)
    return hidden + ffn_out


# ----------------------------------------------------------------------------- the layer
def mot_config(options: MoTOptions) -> ModalityTransformerConfig:
    return ModalityTransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=FFN,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        normalization="RMSNorm", layernorm_epsilon=EPS, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, modality_layout=LAYOUT, mot=options,
    )


def run_layer(layer, x, modality_ids_bs, output_grad):
    context = ModalityContext()
    attach_context(layer, context)
    context.index = ModalityIndex.from_batch(modality_ids_bs, LAYOUT.num_modalities)
    x = x.clone().requires_grad_(True)
    output, _ = layer(x, attention_mask=None)
    (output * output_grad).sum().backward()
    return output.detach(), x.grad


def random_batch(seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=generator)
    modality_ids = (torch.rand(BATCH, SEQ, generator=generator) < 0.5).long()
    return x, modality_ids, torch.randn(SEQ, BATCH, HIDDEN, generator=generator)


def _compare(options: MoTOptions, seed: int):
    from megatron.core import parallel_state
    from megatron.core.transformer.spec_utils import build_module

    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(seed)
    layer = build_module(get_mot_layer_spec(options), config=mot_config(options), layer_number=1)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            scale = 0.1 if "norm" in name else 0.4
            param.copy_(1.0 + scale * torch.randn_like(param) if "norm" in name
                        else scale * torch.randn_like(param))
    x, modality_ids_bs, output_grad = random_batch(seed)
    output, x_grad = run_layer(layer, x, modality_ids_bs, output_grad)
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    for p in layer.parameters():
        p.grad = None
    x_ref = x.clone().requires_grad_(True)
    params = dict(layer.named_parameters())
    expected = reference_mot_layer(x_ref, modality_ids_bs.t(), params, options)
    (expected * output_grad).sum().backward()
    ref_grads = {name: p.grad for name, p in layer.named_parameters()}
    return output, expected.detach(), x_grad, x_ref.grad, grads, ref_grads


TOLERANCE = dict(rtol=1e-5, atol=1e-5)
# Parameter gradients sum over all tokens and reach magnitudes of ~50: fp32 summation order.
GRAD_TOLERANCE = dict(rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "options",
    [
        MoTOptions(),
        MoTOptions(norm_placement="post"),
        MoTOptions(untie={"ffn"}),
        MoTOptions(untie={"ffn", "attention"}, qk_layernorm=True),
        MoTOptions(untie={"ffn", "attention", "norms"}, norm_placement="post", qk_layernorm=True),
    ],
    ids=["pre-all", "post-all", "pre-ffn", "pre-ffn-attention-qknorm", "post-all-qknorm"],
)
def test_mot_layer_matches_reference(options):
    output, expected, x_grad, ref_x_grad, grads, ref_grads = run_on_ranks(
        _compare, 1, options, 3, timeout=120
    )[0]
    torch.testing.assert_close(output, expected, **TOLERANCE)
    torch.testing.assert_close(x_grad, ref_x_grad, **TOLERANCE)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **GRAD_TOLERANCE, msg=name)
    untied = {name for name in grads if name.endswith((".text", ".image"))}
    tied = {name for name in grads if name.endswith(".shared")}
    for component, prefixes in (("ffn", ("mlp.linear",)), ("attention", ("self_attention.linear",))):
        names = {n for n in grads if n.startswith(prefixes)}
        assert names <= (untied if options.is_untied(component) else tied)


def _mot_with_dense_weights_vs_dense():
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(0)
    options = MoTOptions()
    config = mot_config(options)
    dense = build_module(get_gpt_layer_local_spec(normalization="RMSNorm"), config=config,
                         layer_number=1)
    mot = build_module(get_mot_layer_spec(options), config=config, layer_number=1)
    d = dict(dense.named_parameters())
    with torch.no_grad():
        for p in d.values():
            p.normal_(0, 0.3)
        d["input_layernorm.weight"].add_(1.0)
        d["pre_mlp_layernorm.weight"].add_(1.0)
        head_dim = HIDDEN // HEADS
        qkv = d["self_attention.linear_qkv.weight"].view(HEADS, 3, head_dim, HIDDEN)
        gate, up = d["mlp.linear_fc1.weight"].chunk(2)
        dense_of = {
            "input_layernorm.weight": d["input_layernorm.weight"],
            "pre_mlp_layernorm.weight": d["pre_mlp_layernorm.weight"],
            "self_attention.linear_q.weight": qkv[:, 0].reshape(-1, HIDDEN),
            "self_attention.linear_k.weight": qkv[:, 1].reshape(-1, HIDDEN),
            "self_attention.linear_v.weight": qkv[:, 2].reshape(-1, HIDDEN),
            "self_attention.linear_proj.weight": d["self_attention.linear_proj.weight"],
            "mlp.linear_gate.weight": gate,
            "mlp.linear_up.weight": up,
            "mlp.linear_down.weight": d["mlp.linear_fc2.weight"],
        }
        for name, param in mot.named_parameters():
            param.copy_(dense_of[name.rsplit(".", 1)[0]])
    x, modality_ids, grad = random_batch(9)
    mot_output, _ = run_layer(mot, x, modality_ids, grad)
    dense_output, _ = dense(x, attention_mask=None)
    return mot_output, dense_output.detach()


def test_mot_with_the_dense_weights_in_every_modality_equals_megatron_dense_layer():
    mot_output, dense_output = run_on_ranks(_mot_with_dense_weights_vs_dense, 1, timeout=120)[0]
    torch.testing.assert_close(mot_output, dense_output, **TOLERANCE)


def test_unknown_untie_component_is_refused():
    with pytest.raises(ValueError, match="unknown"):
        MoTOptions(untie={"ffn", "embeddings"})
