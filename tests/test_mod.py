"""Mixture-of-Depths layer against a reference built from Megatron's plain TransformerLayer
(same weights), and its causal inference path."""

import math

import pytest
import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_moma.config import ModalityTransformerConfig, MoDOptions
from megatron_moma.modality import ModalityIndex, ModalityLayout
from megatron_moma.modality.context import ModalityContext, attach_context
from megatron_moma.testing.multiprocess import run_on_ranks

HIDDEN, HEADS, FFN, SEQ, BATCH = 16, 4, 24, 12, 3
LAYOUT = ModalityLayout.text_and_image(50, 99)


def _config(options: MoDOptions):
    return ModalityTransformerConfig(
        num_layers=2, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=FFN,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        normalization="RMSNorm", hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, modality_layout=LAYOUT, mod=options,
    )


def _build(options: MoDOptions, seed: int):
    """(MoD layer 0, a plain TransformerLayer with the same weights)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    from megatron_moma.specs import get_mod_layer_spec

    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(seed)
    config = _config(options)
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    mod_layer = build_module(get_mod_layer_spec(spec), config=config, layer_number=1)
    plain = build_module(spec, config=config, layer_number=1)
    with torch.no_grad():
        for param in mod_layer.parameters():
            param.normal_(0, 0.3)
    plain.load_state_dict(mod_layer.state_dict(), strict=False)
    context = ModalityContext()
    attach_context(mod_layer, context)
    return mod_layer, plain, context


def _batch(seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=generator)
    modality_ids = (torch.rand(BATCH, SEQ, generator=generator) < 0.5).long()
    return x, modality_ids


def reference_mod(x, router_weight, plain_layer, capacity, scope, rotary=None):
    """The top-k tokens by sigmoid(x w), of each sequence (`scope="sequence"`, k = ceil(c s))
    or of the whole batch (`"batch"`, k = ceil(c s b)), go through the layer, sequence by
    sequence, at their own rotary positions (rotary [s, 1, 1, d]): y = x + r (L(x) - x)."""
    s, b, _ = x.shape
    scores = torch.sigmoid(x @ router_weight.t()).squeeze(-1)  # [s, b]
    taken = torch.zeros(s, b, dtype=torch.bool)
    if scope == "sequence":
        taken.scatter_(0, scores.topk(math.ceil(capacity * s), dim=0).indices, True)
    else:
        taken.view(-1)[scores.reshape(-1).topk(math.ceil(capacity * s * b)).indices] = True
    output = x.clone()
    for i in range(b):
        chosen = taken[:, i].nonzero().view(-1)
        if not chosen.numel():
            continue
        processed, _ = plain_layer(x[chosen, i : i + 1], attention_mask=None,
                                   rotary_pos_emb=None if rotary is None else rotary[chosen])
        update = x[chosen, i] + scores[chosen, i, None] * (processed[:, 0] - x[chosen, i])
        output[chosen, i] = update
    return output, taken


def _rotary_embedding():
    """Megatron's rotary frequencies for SEQ positions: [s, 1, 1, head_dim]."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    return RotaryEmbedding(kv_channels=HIDDEN // HEADS, rotary_percent=1.0)(SEQ)


def _compare_training(options, seed, rotary=False):
    mod_layer, plain, context = _build(options, seed)
    x, modality_ids = _batch(seed)
    context.index = ModalityIndex.from_batch(modality_ids, LAYOUT.num_modalities)
    mod_layer.train()
    emb = _rotary_embedding() if rotary else None
    x_mod = x.clone().requires_grad_(True)
    output, _ = mod_layer(x_mod, attention_mask=None, rotary_pos_emb=emb)
    grad = torch.randn_like(output)
    (output * grad).sum().backward()
    x_ref = x.clone().requires_grad_(True)
    expected, taken = reference_mod(x_ref, mod_layer.mod_router.weight, plain, options.capacity,
                                    options.topk_scope, emb)
    (expected * grad).sum().backward()
    grads = {n: p.grad for n, p in mod_layer.named_parameters() if p.grad is not None}
    plain_grads = {n: p.grad for n, p in plain.named_parameters()}
    return (output.detach(), expected.detach(), x_mod.grad, x_ref.grad, grads, plain_grads,
            taken.sum(0))


@pytest.mark.parametrize("scope", ["batch", "sequence"])
@pytest.mark.parametrize("capacity, rotary", [(0.25, False), (0.5, True), (1.0, False)])
def test_mod_layer_matches_reference(capacity, rotary, scope):
    output, expected, x_grad, ref_x_grad, grads, plain_grads, per_sequence = run_on_ranks(
        _compare_training, 1, MoDOptions(capacity=capacity, topk_scope=scope), 4, rotary,
        timeout=120)[0]
    if scope == "batch" and capacity < 1:
        assert len(set(per_sequence.tolist())) > 1, "every sequence kept as many: weak test"
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_grad, ref_x_grad, rtol=1e-4, atol=1e-4)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-4, msg=name)
    assert grads["mod_router.weight"].abs().sum() > 0, "the router gets no gradient"
    assert grads["mod_aux_router.linear_in"].abs().sum() > 0, "the auxiliary router does not learn"


def _skipped_tokens_and_causality(seed):
    mod_layer, _, context = _build(MoDOptions(), seed)
    mod_layer.eval()
    with torch.no_grad():
        mod_layer.mod_aux_router.linear_out.add_(0.3)  # some tokens above 0.5, some below
    x, modality_ids = _batch(seed)
    context.index = ModalityIndex.from_batch(modality_ids, LAYOUT.num_modalities)
    with torch.no_grad():
        first, _ = mod_layer(x, attention_mask=None)
        changed = x.clone()
        changed[SEQ // 2 :] = torch.randn_like(changed[SEQ // 2 :])
        second, _ = mod_layer(changed, attention_mask=None)
        taken = mod_layer.mod_aux_router(x).squeeze(-1) > 0.5
    return x, first, second, taken


def test_causal_inference_routes_by_the_auxiliary_router_and_never_looks_ahead():
    x, first, second, taken = run_on_ranks(_skipped_tokens_and_causality, 1, 5, timeout=120)[0]
    assert 0 < int(taken.sum()) < taken.numel(), "aux router took all or no token: weak test"
    torch.testing.assert_close(first[~taken], x[~taken], rtol=0, atol=0)
    assert not torch.allclose(first[taken], x[taken])
    # Later tokens change the shapes of the matmuls, not the math: fp32 rounding only.
    torch.testing.assert_close(second[: SEQ // 2], first[: SEQ // 2], rtol=1e-6, atol=1e-6)


def _layer_pattern():
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    from megatron_moma.specs import get_mod_layer_spec

    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(0)
    spec = get_mod_layer_spec(get_gpt_layer_local_spec(normalization="RMSNorm"))
    routes = {}
    for options in (MoDOptions(), MoDOptions(layers=(1,))):
        config = _config(options)
        routes[options.layers] = [
            build_module(spec, config=config, layer_number=n).routes_tokens for n in (1, 2)
        ]
    return routes


def test_default_pattern_alternates_from_layer_0():
    routes = run_on_ranks(_layer_pattern, 1, timeout=120)[0]
    assert routes[None] == [True, False]
    assert routes[(1,)] == [False, True]


def test_bad_mod_options_are_refused():
    with pytest.raises(ValueError, match="capacity"):
        MoDOptions(capacity=0.0)
    with pytest.raises(ValueError, match="needs aux_router"):
        MoDOptions(aux_router=False)
    with pytest.raises(ValueError, match="do not exist"):
        _config(MoDOptions(layers=(5,)))
