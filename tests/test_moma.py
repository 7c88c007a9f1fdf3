"""MoMa MLP against an independent pure-torch reference of docs/layers.md §§2, 3.

The reference below shares no code with megatron_moma.layers: it reads the layer's weights and
recomputes, token group by token group and expert by expert, what the spec says.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_moma.config import ModalityTransformerConfig, MoMaOptions
from megatron_moma.layers.moma import MoMaMLP
from megatron_moma.layers.routers import ExpertChoiceRouter
from megatron_moma.modality import ModalityIndex, ModalityLayout
from megatron_moma.modality.context import ModalityContext, attach_context
from megatron_moma.specs import get_moma_layer_spec
from megatron_moma.testing.multiprocess import RankFailure, run_on_ranks

HIDDEN, FFN, SEQ, BATCH = 16, 24, 12, 2
LAYOUT = ModalityLayout.text_and_image(50, 99)  # modality id 0 text, 1 image


# ----------------------------------------------------------------------------- reference
def reference_ffn(x, fc1, fc2):
    """SwiGLU: fc1 rows are [gate; up] (Megatron's gated_linear_unit layout)."""
    gate, up = (x @ fc1.t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ fc2.t()


def reference_moma(x, modality_ids, weights, experts_per_modality, capacity_factor,
                   route_by_aux=False, token_choice_topk=None):
    """x [n, h], modality_ids [n] -> (output [n, h], assignment per modality [n_m, E_m]).

    Expert choice by default; with `token_choice_topk` each token takes its top-k experts of
    softmax(x W^T) (Megatron's pre-softmax top-k) with those probabilities as weights."""
    output = torch.zeros_like(x)
    assignments = {}
    for modality, (name, num_experts) in enumerate(zip(("text", "image"), experts_per_modality)):
        rows = (modality_ids == modality).nonzero().flatten()
        tokens = x[rows]
        if num_experts == 1:
            fc1, fc2 = weights[f"experts.{name}.0"]
            output[rows] += reference_ffn(tokens, fc1, fc2)
            continue
        scores = torch.sigmoid(tokens @ weights[f"routers.{name}"].t())
        taken = torch.zeros_like(scores)
        if token_choice_topk:
            scores = torch.softmax(tokens @ weights[f"routers.{name}"].t(), dim=-1)
            taken.scatter_(1, scores.topk(token_choice_topk, dim=-1).indices, 1.0)
        elif route_by_aux:
            w1, w2 = weights[f"aux_routers.{name}"]
            taken = (torch.sigmoid(F.silu(tokens @ w1.t()) @ w2.t()) > 0.5).to(x.dtype)
        elif rows.numel():
            capacity = min(rows.numel(), math.ceil(capacity_factor * rows.numel() / num_experts))
            for expert in range(num_experts):
                taken[scores[:, expert].topk(capacity).indices, expert] = 1.0
        for expert in range(num_experts):
            fc1, fc2 = weights[f"experts.{name}.{expert}"]
            contribution = scores[:, expert:expert + 1] * reference_ffn(tokens, fc1, fc2)
            output[rows] += taken[:, expert:expert + 1] * contribution
        assignments[name] = taken
    return output, assignments


def reference_aux_loss(x, modality_ids, weights, assignments):
    total = x.new_zeros(())
    for modality, name in enumerate(("text", "image")):
        if name not in assignments:
            continue
        tokens = x[(modality_ids == modality).nonzero().flatten()].detach()
        w1, w2 = weights[f"aux_routers.{name}"]
        predicted = torch.sigmoid(F.silu(tokens @ w1.t()) @ w2.t())
        total = total + F.binary_cross_entropy(predicted, assignments[name])
    return total


# ----------------------------------------------------------------------------- the layer
def build_layer(options: MoMaOptions, **config_fields) -> MoMaMLP:
    from megatron.core.transformer.spec_utils import build_module

    config = ModalityTransformerConfig(
        num_layers=1, hidden_size=HIDDEN, ffn_hidden_size=FFN, num_attention_heads=2,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        use_cpu_initialization=True, modality_layout=LAYOUT, moma=options, **config_fields,
    )
    layer = build_module(get_moma_layer_spec().submodules.mlp, config=config)
    for param in layer.parameters():  # away from Megatron's tiny init, so routing matters
        torch.nn.init.normal_(param, std=0.5)
    return layer


def layer_weights(layer: MoMaMLP):
    weights = {f"routers.{name}": r.weight for name, r in layer.routers.items()}
    for name, group in layer.experts.items():
        for j, expert in enumerate(group.local_experts):
            weights[f"experts.{name}.{j}"] = (expert.linear_fc1.weight, expert.linear_fc2.weight)
    for name, aux in (layer.aux_routers or {}).items():
        weights[f"aux_routers.{name}"] = (aux.linear_in, aux.linear_out)
    return weights


def run_layer(layer: MoMaMLP, x, modality_ids_bs, output_grad):
    """x [s, b, h]; returns (output, x grad) and leaves parameter grads on the layer."""
    context = ModalityContext()
    attach_context(layer, context)
    context.index = ModalityIndex.from_batch(modality_ids_bs, LAYOUT.num_modalities)
    x = x.clone().requires_grad_(True)
    output, bias = layer(x)
    assert bias is None
    (output * output_grad).sum().backward()
    return output.detach(), x.grad


def random_batch(seed, image_share=0.5):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=generator)
    modality_ids = (torch.rand(BATCH, SEQ, generator=generator) < image_share).long()
    output_grad = torch.randn(SEQ, BATCH, HIDDEN, generator=generator)
    return x, modality_ids, output_grad


def _compare_with_reference(options: MoMaOptions, seed: int, image_share: float, training: bool):
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel()
    torch.manual_seed(seed)
    layer = build_layer(options)
    layer.train(training)
    x, modality_ids_bs, output_grad = random_batch(seed, image_share)
    output, x_grad = run_layer(layer, x, modality_ids_bs, output_grad)
    grads = {name: None if p.grad is None else p.grad.clone() for name, p in layer.named_parameters()}
    for p in layer.parameters():
        p.grad = None

    flat_x = x.reshape(-1, HIDDEN).clone().requires_grad_(True)
    flat_ids = modality_ids_bs.t().reshape(-1)
    ref_output, assignments = reference_moma(
        flat_x, flat_ids, layer_weights(layer), options.experts_per_modality,
        options.capacity_factor, route_by_aux=not training and options.routing == "expert_choice",
        token_choice_topk=options.token_choice_topk if options.routing == "token_choice" else None,
    )
    loss = (ref_output * output_grad.reshape(-1, HIDDEN)).sum()
    if training and options.aux_router and options.routing == "expert_choice":
        loss = loss + options.aux_loss_coeff * reference_aux_loss(
            flat_x, flat_ids, layer_weights(layer), assignments
        )
    loss.backward()
    ref_grads = {name: p.grad for name, p in layer.named_parameters()}
    return (output.reshape(-1, HIDDEN), ref_output.detach(), x_grad.reshape(-1, HIDDEN),
            flat_x.grad, grads, ref_grads, {k: float(v.sum()) for k, v in assignments.items()})


TOLERANCE = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "options, image_share",
    [
        (MoMaOptions(experts_per_modality=(4, 4), capacity_factor=1.0), 0.5),
        (MoMaOptions(experts_per_modality=(2, 3), capacity_factor=1.5, aux_loss_coeff=0.3), 0.3),
        (MoMaOptions(experts_per_modality=(1, 1)), 0.5),
        (MoMaOptions(experts_per_modality=(4, 2)), 0.0),  # no image token in the micro-batch
        (MoMaOptions(experts_per_modality=(4, 4), routing="token_choice", token_choice_topk=2), 0.5),
        (MoMaOptions(experts_per_modality=(3, 2), routing="token_choice", token_choice_topk=1), 0.4),
    ],
    ids=["4t4i", "2t3i-cf1.5", "1t1i", "4t2i-text-only", "4t4i-token-choice-top2",
         "3t2i-token-choice-top1"],
)
def test_training_matches_reference(options, image_share):
    out, ref_out, x_grad, ref_x_grad, grads, ref_grads, taken = run_on_ranks(
        _compare_with_reference, 1, options, 7, image_share, True, timeout=120
    )[0]
    torch.testing.assert_close(out, ref_out, **TOLERANCE)
    torch.testing.assert_close(x_grad, ref_x_grad, **TOLERANCE)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert ref_grads[name] is not None, f"{name} is not in the reference graph"
        torch.testing.assert_close(grads[name], ref_grads[name], **TOLERANCE, msg=name)
    assert out.abs().sum() > 0
    if options.experts_per_modality[0] > 1:
        assert taken["text"] > 0, "expert choice took no text token: nothing was compared"


def test_aux_routers_learn_the_noise_free_assignment_under_gumbel_noise():
    """With Gumbel noise the layer routes by noisy scores, but the auxiliary routers' targets
    are the expert choice of the noise-free scores: what the main routers decide at inference."""
    options = MoMaOptions(experts_per_modality=(4, 4), gumbel_noise=True)
    out, ref_out, _, _, grads, ref_grads, _ = run_on_ranks(
        _compare_with_reference, 1, options, 7, 0.5, True, timeout=120
    )[0]
    assert not torch.allclose(out, ref_out, **TOLERANCE), "the noise changed nothing: weak test"
    aux = [name for name in grads if name.startswith("aux_routers.")]
    assert aux
    for name in aux:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOLERANCE, msg=name)


def _token_choice_router_grads_from_the_load_balancing_loss(coeff: float):
    """Router gradients of a token-choice layer whose output gets no gradient: only Megatron's
    load-balancing loss (moe_aux_loss_coeff) reaches the routers. Returns (grads, reference)."""
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel()
    torch.manual_seed(3)
    topk, experts = 2, (4, 3)
    layer = build_layer(MoMaOptions(experts_per_modality=experts, routing="token_choice",
                                    token_choice_topk=topk), moe_aux_loss_coeff=coeff)
    layer.set_layer_number(1)
    layer.train()
    x, modality_ids_bs, _ = random_batch(5)
    run_layer(layer, x, modality_ids_bs, torch.zeros_like(x))
    flat_x, flat_ids = x.reshape(-1, HIDDEN), modality_ids_bs.t().reshape(-1)
    grads, reference = {}, {}
    for modality, (name, num_experts) in enumerate(zip(("text", "image"), experts)):
        weight = layer.routers[name].weight.detach().clone().requires_grad_(True)
        probs = torch.softmax(flat_x[flat_ids == modality] @ weight.t(), dim=-1)
        tokens = probs.shape[0]
        chosen = torch.zeros_like(probs).scatter_(1, probs.topk(topk, dim=-1).indices, 1.0)
        # Switch Transformer: E * sum_i f_i P_i, f_i the share of the top-k slots of expert i.
        fraction, mean_prob = chosen.sum(0) / (tokens * topk), probs.mean(0)
        (coeff * num_experts * (fraction * mean_prob).sum()).backward()
        grads[name], reference[name] = layer.routers[name].weight.grad, weight.grad
    return grads, reference


@pytest.mark.parametrize("coeff", [0.0, 0.1])
def test_token_choice_load_balancing_loss_takes_moe_aux_loss_coeff(coeff):
    grads, reference = run_on_ranks(
        _token_choice_router_grads_from_the_load_balancing_loss, 1, coeff, timeout=120)[0]
    for name in ("text", "image"):
        assert (coeff == 0) == (grads[name] is None or not grads[name].any()), name
        if coeff:
            torch.testing.assert_close(grads[name], reference[name], **TOLERANCE, msg=name)


def _outputs_with_and_without_padding_rows():
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel()
    torch.manual_seed(2)
    layer = build_layer(MoMaOptions(experts_per_modality=(4, 2)))
    layer.train()
    x, modality_ids_bs, grad = random_batch(9)
    plain, _ = run_layer(layer, x, modality_ids_bs, grad)
    padding = torch.full((BATCH, 5), LAYOUT.num_modalities)  # MoD's padding rows, last
    padded_x = torch.cat([x, torch.randn(5, BATCH, HIDDEN)])
    padded, _ = run_layer(layer, padded_x, torch.cat([modality_ids_bs, padding], dim=1),
                          torch.cat([grad, torch.randn(5, BATCH, HIDDEN)]))
    return plain, padded


def test_padding_rows_are_routed_to_no_expert():
    """Rows of the padding id (a MoD layer's batch scope) take no expert capacity: the other
    rows' outputs are unchanged and the padding's are 0."""
    plain, padded = run_on_ranks(_outputs_with_and_without_padding_rows, 1, timeout=120)[0]
    torch.testing.assert_close(padded[:SEQ], plain, rtol=0, atol=0)
    assert not padded[SEQ:].any()


def test_aux_router_inference_matches_reference():
    options = MoMaOptions(experts_per_modality=(4, 4))
    out, ref_out, x_grad, ref_x_grad, grads, ref_grads, taken = run_on_ranks(
        _compare_with_reference, 1, options, 11, 0.5, False, timeout=120
    )[0]
    assert 0 < taken["text"] < (SEQ * BATCH) * 4, "aux routing took all or no tokens: weak test"
    torch.testing.assert_close(out, ref_out, **TOLERANCE)
    torch.testing.assert_close(x_grad, ref_x_grad, **TOLERANCE)


def _one_t_one_i_vs_dense():
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel()
    torch.manual_seed(0)
    layer = build_layer(MoMaOptions(experts_per_modality=(1, 1)))
    text = layer.experts["text"].local_experts[0]
    image = layer.experts["image"].local_experts[0]
    with torch.no_grad():
        image.linear_fc1.weight.copy_(text.linear_fc1.weight)
        image.linear_fc2.weight.copy_(text.linear_fc2.weight)
    x, modality_ids, grad = random_batch(3)
    output, _ = run_layer(layer, x, modality_ids, grad)
    dense, _ = text(x.reshape(-1, HIDDEN))
    return output.reshape(-1, HIDDEN), dense.detach()


def test_1t1i_with_identical_experts_equals_the_dense_mlp():
    output, dense = run_on_ranks(_one_t_one_i_vs_dense, 1, timeout=120)[0]
    torch.testing.assert_close(output, dense, **TOLERANCE)


def _text_output_under_two_image_experts():
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel()
    torch.manual_seed(0)
    layer = build_layer(MoMaOptions(experts_per_modality=(2, 2)))
    x, modality_ids, grad = random_batch(5)
    first, _ = run_layer(layer, x, modality_ids, grad)
    with torch.no_grad():
        for param in layer.experts["image"].parameters():
            param.mul_(-3.0)
        layer.routers["image"].weight.add_(1.0)
    second, _ = run_layer(layer, x, modality_ids, grad)
    text_rows = (modality_ids.t().reshape(-1) == 0).nonzero().flatten()
    image_rows = (modality_ids.t().reshape(-1) == 1).nonzero().flatten()
    flat = lambda t: t.reshape(-1, HIDDEN)  # noqa: E731
    return flat(first)[text_rows], flat(second)[text_rows], flat(first)[image_rows], flat(second)[image_rows]


def test_image_experts_do_not_change_text_outputs():
    text_before, text_after, image_before, image_after = run_on_ranks(
        _text_output_under_two_image_experts, 1, timeout=120
    )[0]
    torch.testing.assert_close(text_after, text_before, rtol=0, atol=0)
    assert not torch.allclose(image_after, image_before)


def _grads_of_an_absent_modality():
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel()
    layer = build_layer(MoMaOptions(experts_per_modality=(2, 2)))
    x, _, grad = random_batch(1)
    run_layer(layer, x, torch.zeros(BATCH, SEQ, dtype=torch.long), grad)
    return {name: (p.grad is not None, float(p.grad.abs().sum()) if p.grad is not None else None)
            for name, p in layer.named_parameters()}


def test_a_modality_absent_from_the_micro_batch_keeps_its_parameters_in_the_graph():
    grads = run_on_ranks(_grads_of_an_absent_modality, 1, timeout=120)[0]
    image_experts = {k: v for k, v in grads.items() if k.startswith("experts.image")}
    assert image_experts and all(has and total == 0 for has, total in image_experts.values())
    assert grads["experts.text.local_experts.0.linear_fc1.weight"][1] > 0


def _layer_under_another_expert_tp_than_parallel_state():
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel()  # expert-TP 1
    build_layer(MoMaOptions(experts_per_modality=(2, 2)), expert_tensor_parallel_size=2)


def test_expert_tp_of_the_config_must_match_the_parallel_state():
    with pytest.raises(RankFailure, match="expert_tensor_parallel_size is 2 but megatron-core's "
                                          "expert-tensor-parallel group has 1 ranks"):
        run_on_ranks(_layer_under_another_expert_tp_than_parallel_state, 1, timeout=120)


def _router_scores_with_gumbel_noise():
    from megatron.core import parallel_state

    from megatron_moma.layers.routers import ExpertChoiceRouter

    parallel_state.initialize_model_parallel()
    config = ModalityTransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=2, use_cpu_initialization=True,
        modality_layout=LAYOUT, moma=MoMaOptions(experts_per_modality=(4, 4)),
    )
    router = ExpertChoiceRouter(config, num_experts=4, gumbel_noise=True)
    tokens = torch.randn(4096, HIDDEN)
    with torch.no_grad():
        clean = torch.sigmoid(tokens @ router.weight.t())
        router.train()
        torch.manual_seed(0)
        noisy = router(tokens)
        router.eval()
        return clean, noisy, router(tokens)


def _gumbel_noise_of_each_tp_rank(sequence_parallel: bool):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    model_parallel_cuda_manual_seed(5)
    config = ModalityTransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=2, use_cpu_initialization=True,
        tensor_model_parallel_size=2, sequence_parallel=sequence_parallel, add_bias_linear=False,
        modality_layout=LAYOUT, moma=MoMaOptions(experts_per_modality=(4, 4), gumbel_noise=True),
    )
    router = ExpertChoiceRouter(config, num_experts=4, gumbel_noise=True)
    tokens = torch.randn(64, HIDDEN, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.logit(router(tokens).double()) - tokens.double() @ router.weight.double().t()


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sp"])
def test_gumbel_noise_under_tensor_parallelism(sequence_parallel):
    """Without SP the TP ranks route the same tokens: the same noise on both. Under SP each rank
    scores its own tokens: independent noise (the same draws would correlate the chunks)."""
    first, second = run_on_ranks(_gumbel_noise_of_each_tp_rank, 2, sequence_parallel, timeout=120)
    assert first.abs().mean() > 0.5  # noise was added
    if sequence_parallel:
        assert abs(float(torch.corrcoef(torch.stack([first.view(-1), second.view(-1)]))[0, 1])) < 0.2
    else:
        torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_gumbel_sigmoid_noise_is_logistic_and_training_only():
    clean, noisy, evaluated = run_on_ranks(_router_scores_with_gumbel_noise, 1, timeout=120)[0]
    torch.testing.assert_close(evaluated, clean)
    # g1 - g2 of two iid Gumbel(0, 1) is Logistic(0, 1): mean 0, variance pi^2 / 3.
    noise = torch.logit(noisy.double()) - torch.logit(clean.double())
    assert abs(float(noise.mean())) < 0.05
    assert abs(float(noise.var()) - math.pi ** 2 / 3) < 0.15
