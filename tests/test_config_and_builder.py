"""ModalityTransformerConfig validation and the model builder's architectures."""

import pytest
import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_moma.config import ModalityTransformerConfig, MoDOptions, MoMaOptions, MoTOptions
from megatron_moma.modality import Modality, ModalityLayout
from megatron_moma.testing.multiprocess import run_on_ranks

TEXT_IMAGE = ModalityLayout.text_and_image(64, 127)


def config(**kwargs):
    base = dict(num_layers=2, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32,
                gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
                normalization="RMSNorm", use_cpu_initialization=True, modality_layout=TEXT_IMAGE)
    base.update(kwargs)
    return ModalityTransformerConfig(**base)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(moma=MoMaOptions(experts_per_modality=(2, 2, 2))), "has 3 groups but the modality layout has 2"),
        (dict(moma=MoMaOptions(experts_per_modality=(1, 2)), expert_model_parallel_size=2),
         "group 'text' has 1 experts, not divisible by expert_model_parallel_size 2"),
        (dict(moma=MoMaOptions(experts_per_modality=(2, 2), routing="token_choice"),
              tensor_model_parallel_size=2), "needs sequence_parallel=True"),
        (dict(moma=MoMaOptions(experts_per_modality=(2, 2), routing="token_choice"),
              tensor_model_parallel_size=2, sequence_parallel=True,
              moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid"),
         "expert bias is not supported under sequence parallelism"),
        (dict(mot=MoTOptions(norm_placement="post"), moma=MoMaOptions()), "norm_placement='pre' only"),
        (dict(mot=MoTOptions(), recompute_granularity="full", recompute_method="uniform",
              recompute_num_layers=1, pipeline_model_parallel_size=2, pipeline_dtype=torch.float32),
         "activation recompute with pipeline parallelism"),
    ],
)
def test_invalid_configs_say_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        config(**kwargs)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(routing="sparse"), "routing must be one of"),
        (dict(capacity_factor=0), "capacity_factor must be > 0"),
        (dict(experts_per_modality=(0, 1)), "must be >= 1"),
        (dict(token_choice_topk=3, experts_per_modality=(2, 4)), "token_choice_topk must be in"),
        (dict(aux_router=False), "needs aux_router=True"),
    ],
)
def test_invalid_moma_options_say_what_is_wrong(options, message):
    with pytest.raises(ValueError, match=message):
        MoMaOptions(**options)


def test_modality_layout_rejects_overlaps_and_text_ranges():
    with pytest.raises(ValueError, match="overlap"):
        ModalityLayout((Modality("image", 10, 20), Modality("speech", 20, 30)))
    with pytest.raises(ValueError, match="implicit modality"):
        Modality("text", 0, 5)


def test_expert_capacity_is_ceil_of_capacity_factor_share():
    options = MoMaOptions(experts_per_modality=(4, 4), capacity_factor=1.0)
    assert options.expert_capacity(num_tokens=10, num_experts=4) == 3  # ceil(10 / 4)
    assert options.expert_capacity(num_tokens=0, num_experts=4) == 0
    assert MoMaOptions(capacity_factor=8.0).expert_capacity(10, 4) == 10  # at most every token


@pytest.mark.parametrize(
    "kwargs, architecture",
    [
        (dict(), "dense"),
        (dict(moma=MoMaOptions(experts_per_modality=(2, 2))), "moma"),
        (dict(mot=MoTOptions()), "mot"),
        (dict(mot=MoTOptions(), moma=MoMaOptions(experts_per_modality=(2, 1))), "mot+moma"),
        (dict(moma=MoMaOptions(), mod=MoDOptions()), "moma+mod"),
    ],
)
def test_architecture_names(kwargs, architecture):
    assert config(**kwargs).architecture == architecture


def _parameter_names(kwargs):
    from megatron.core import parallel_state

    from megatron_moma.models import build_gpt_model

    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(0)
    model = build_gpt_model(config(**kwargs), vocab_size=128, max_sequence_length=16)
    return [name for name, _ in model.named_parameters()]


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(moma=MoMaOptions(experts_per_modality=(2, 2))),
         ["decoder.layers.0.mlp.routers.image.weight",
          "decoder.layers.0.mlp.experts.text.local_experts.1.linear_fc1.weight",
          "decoder.layers.1.mlp.aux_routers.text.linear_in"]),
        (dict(mot=MoTOptions(qk_layernorm=True)),
         ["decoder.layers.0.self_attention.linear_q.weight.image",
          "decoder.layers.0.self_attention.q_layernorm.weight.text",
          "decoder.layers.1.mlp.linear_down.weight.text",
          "decoder.layers.1.pre_mlp_layernorm.weight.image"]),
        (dict(mot=MoTOptions(untie={"ffn"}), mod=MoDOptions()),
         ["decoder.layers.0.mod_router.weight",
          "decoder.layers.0.self_attention.linear_q.weight.shared",
          "decoder.layers.0.mlp.linear_up.weight.image"]),
    ],
    ids=["moma", "mot", "mot-ffn+mod"],
)
def test_built_models_name_parameters_after_their_modality(kwargs, expected):
    names = run_on_ranks(_parameter_names, 1, kwargs, timeout=120)[0]
    assert set(expected) <= set(names), sorted(set(expected) - set(names))
    if "mod" in kwargs:
        assert not any(n.startswith("decoder.layers.1.mod_") for n in names)


def test_specs_use_local_modules_where_transformer_engine_is_absent():
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.moe.experts import SequentialMLP

    from megatron_moma.layers.sdpa_attention import SDPACoreAttention
    from megatron_moma.models import get_layer_spec
    from megatron_moma.specs.backend import transformer_engine_available

    if transformer_engine_available():
        pytest.skip("Transformer Engine imports here: the local fallback is not what is built")
    moma = get_layer_spec(config(moma=MoMaOptions(experts_per_modality=(2, 2))))
    assert moma.submodules.mlp.submodules.experts.module is SequentialMLP
    mot = get_layer_spec(config(mot=MoTOptions()))
    assert mot.submodules.self_attention.submodules.core_attention is SDPACoreAttention
    local = get_layer_spec(config(mot=MoTOptions(), attention_backend=AttnBackend.local))
    assert local.submodules.self_attention.submodules.core_attention is DotProductAttention
    with pytest.raises(RuntimeError, match="transformer_engine does not import"):
        get_layer_spec(config(mot=MoTOptions()), use_te=True)
