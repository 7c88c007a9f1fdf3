"""Which modules each architecture's layer spec names: Transformer Engine's or local ones.

Transformer Engine does not import on CPU. megatron-core's extension module still imports and
names TE's classes with placeholder objects, so a TE spec's choices are checked here by identity
with those names (`te.TEDotProductAttention`, ...), after pretending TE imports through our own
availability flag. The one TE-only function that cannot run without TE, megatron-core's
`get_gpt_layer_with_transformer_engine_spec` (the frame of dense and MoMa layers), is replaced by
a recorder of its arguments; tests/test_gpu.py builds every spec with the real TE.
"""

import types

import pytest
import torch.nn.functional as F
from megatron.core.extensions import transformer_engine as te
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.moe.experts import SequentialMLP, TEGroupedMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_moma.config import (
    ExpertFp8Options,
    ModalityTransformerConfig,
    MoDOptions,
    MoMaOptions,
    MoTOptions,
)
from megatron_moma.layers.grouped_experts import GroupedExpertMLP
from megatron_moma.layers.mod import MoDTransformerLayer
from megatron_moma.layers.moma import MoMaMLP
from megatron_moma.layers.mot import MoTSelfAttention
from megatron_moma.layers.sdpa_attention import SDPACoreAttention
from megatron_moma.models import get_layer_spec
from megatron_moma.modality import ModalityLayout
from megatron_moma.specs import backend, get_moma_layer_spec, get_mot_layer_spec

MOMA = MoMaOptions(experts_per_modality=(2, 2))
HYBRID = ExpertFp8Options(format="hybrid", recipe="rowwise")


def config(**kwargs):
    base = dict(num_layers=2, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32,
                gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
                normalization="RMSNorm", use_cpu_initialization=True,
                modality_layout=ModalityLayout.text_and_image(64, 127))
    base.update(kwargs)
    return ModalityTransformerConfig(**base)


def experts_of(spec: ModuleSpec) -> ModuleSpec:
    mlp = spec.submodules.mlp
    assert mlp.module is MoMaMLP
    return mlp.submodules.experts


@pytest.fixture
def without_te():
    if backend.transformer_engine_available():
        pytest.skip("Transformer Engine imports here")


@pytest.fixture
def pretend_te(monkeypatch):
    """Our availability flag says TE imports; megatron-core's TE layer spec records its call."""
    calls = []

    def te_layer_spec(num_experts=None, qk_layernorm=False):
        calls.append(dict(num_experts=num_experts, qk_layernorm=qk_layernorm))
        attention = ModuleSpec(module=SelfAttention, submodules=SelfAttentionSubmodules(
            linear_qkv=te.TELayerNormColumnParallelLinear, core_attention=te.TEDotProductAttention,
            linear_proj=te.TERowParallelLinear))
        return ModuleSpec(module=TransformerLayer,
                          submodules=TransformerLayerSubmodules(self_attention=attention))

    monkeypatch.setattr(backend, "gpt_layer_specs", types.SimpleNamespace(
        HAVE_TE=True, get_gpt_layer_with_transformer_engine_spec=te_layer_spec,
        get_gpt_layer_local_spec=gpt_layer_specs.get_gpt_layer_local_spec))
    return calls


ARCHITECTURES = [dict(), dict(moma=MOMA), dict(mot=MoTOptions()), dict(mot=MoTOptions(), moma=MOMA),
                 dict(moma=MOMA, mod=MoDOptions())]


def core_attention_of(spec: ModuleSpec) -> type:
    return spec.submodules.self_attention.submodules.core_attention


# ------------------------------------------------------------------------ local (no TE)
@pytest.mark.parametrize("backend_name", ["auto", "flash", "fused", "unfused", "local"])
@pytest.mark.parametrize("kwargs", ARCHITECTURES, ids=["dense", "moma", "mot", "mot+moma", "mod"])
def test_local_core_attention_follows_the_attention_backend(without_te, kwargs, backend_name):
    """Without TE every layer's core attention is torch's SDPA, megatron-core's own for local."""
    spec = get_layer_spec(config(attention_backend=AttnBackend[backend_name], **kwargs))
    expected = DotProductAttention if backend_name == "local" else SDPACoreAttention
    assert core_attention_of(spec) is expected


def test_local_specs_name_megatron_core_modules(without_te):
    dense = get_layer_spec(config())
    attention = dense.submodules.self_attention.submodules
    assert attention.linear_qkv is ColumnParallelLinear
    assert attention.core_attention is SDPACoreAttention  # attention_backend auto
    assert attention.linear_proj is RowParallelLinear

    moma = get_layer_spec(config(moma=MOMA))
    assert core_attention_of(moma) is SDPACoreAttention
    experts = experts_of(moma)
    assert experts.module is SequentialMLP
    assert (experts.submodules.linear_fc1, experts.submodules.linear_fc2) == (
        ColumnParallelLinear, RowParallelLinear)

    mot = get_layer_spec(config(mot=MoTOptions()))
    assert mot.submodules.self_attention.module is MoTSelfAttention
    assert core_attention_of(mot) is SDPACoreAttention

    assert get_layer_spec(config(moma=MOMA, mod=MoDOptions())).module is MoDTransformerLayer


@pytest.mark.parametrize("kwargs, fp8_options", [
    (dict(moma=MOMA, moe_grouped_gemm=True), None),
    (dict(moma=MOMA, expert_fp8=HYBRID), HYBRID),
    (dict(mot=MoTOptions(), moma=MOMA, moe_grouped_gemm=True), None),
    (dict(mot=MoTOptions(), moma=MOMA, expert_fp8=HYBRID), HYBRID),
], ids=["moma-grouped", "moma-fp8", "mot+moma-grouped", "mot+moma-fp8"])
def test_local_grouped_gemm_and_fp8_experts_are_grouped_expert_mlps(without_te, kwargs,
                                                                    fp8_options):
    experts = experts_of(get_layer_spec(config(**kwargs)))
    assert experts.module is GroupedExpertMLP
    assert experts.params == {"fp8_options": fp8_options}
    # The same local linears as SequentialMLP's hold the weights (same names, same checkpoints).
    assert (experts.submodules.linear_fc1, experts.submodules.linear_fc2) == (
        ColumnParallelLinear, RowParallelLinear)


def test_local_moma_layer_saves_its_norms_under_the_te_layers_keys(without_te):
    """TE fuses the input norm into the QKV linear (`self_attention.linear_qkv.layer_norm_*`)
    and keeps MoMa's pre-MLP norm a separate TENorm (`pre_mlp_layernorm.*`)."""
    keys_map = get_moma_layer_spec().submodules.sharded_state_dict_keys_map
    assert keys_map == {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}


def test_requesting_te_where_it_does_not_import_fails_fast(without_te):
    for build in (lambda: get_layer_spec(config(), use_te=True),
                  lambda: get_moma_layer_spec(use_te=True),
                  lambda: get_mot_layer_spec(MoTOptions(), use_te=True)):
        with pytest.raises(RuntimeError, match="transformer_engine does not import here"):
            build()


def test_te_fp8_config_without_te_fails_fast(without_te):
    dense = config()
    dense.fp8 = "hybrid"  # megatron-core would refuse MoE + fp8 without TE at construction
    with pytest.raises(ValueError, match="Transformer Engine's FP8"):
        get_layer_spec(dense)


# ------------------------------------------------------------------------ Transformer Engine
def test_te_specs_name_transformer_engine_modules(pretend_te):
    dense = get_layer_spec(config(qk_layernorm=True))
    assert pretend_te[-1] == dict(num_experts=None, qk_layernorm=True)
    assert dense.module is TransformerLayer

    moma = get_layer_spec(config(moma=MOMA))
    # A separate pre-MLP norm (TENorm), as megatron-core's MoE layers have.
    assert pretend_te[-1] == dict(num_experts=2, qk_layernorm=False)
    assert not moma.submodules.sharded_state_dict_keys_map
    experts = experts_of(moma)
    assert experts.module is SequentialMLP
    assert experts.submodules.linear_fc1 is te.TEColumnParallelLinear
    assert experts.submodules.linear_fc2 is te.TERowParallelLinear

    mot = get_layer_spec(config(mot=MoTOptions(), moma=MOMA))
    assert core_attention_of(mot) is te.TEDotProductAttention
    assert experts_of(mot).submodules.linear_fc1 is te.TEColumnParallelLinear
    assert get_layer_spec(config(mot=MoTOptions(), mod=MoDOptions())).module is MoDTransformerLayer


@pytest.mark.parametrize("backend_name", ["auto", "flash", "fused", "unfused", "local"])
@pytest.mark.parametrize("kwargs", ARCHITECTURES, ids=["dense", "moma", "mot", "mot+moma", "mod"])
def test_te_core_attention_is_te_unless_local(pretend_te, kwargs, backend_name):
    """Under TE the kernel behind TE's attention follows the same setting (megatron-core's
    GPTModel sets NVTE_*_ATTN from it); local is megatron-core's DotProductAttention."""
    spec = get_layer_spec(config(attention_backend=AttnBackend[backend_name], **kwargs))
    expected = DotProductAttention if backend_name == "local" else te.TEDotProductAttention
    assert core_attention_of(spec) is expected


def test_te_grouped_gemm_experts_are_te_grouped_mlps(pretend_te, monkeypatch):
    """TEGroupedMLP on TE's grouped linears; a TE without them fails fast (without TE, the
    placeholders of the grouped linears are None: then stand-ins check the wiring)."""
    grouped = MoMaOptions(experts_per_modality=(2, 2))
    if te.TEColumnParallelGroupedLinear is None:
        with pytest.raises(ValueError, match="transformer-engine >= 1.9"):
            get_layer_spec(config(moma=grouped, moe_grouped_gemm=True))
        stand_ins = {name: type(name, (), {}) for name in
                     ("TEColumnParallelGroupedLinear", "TERowParallelGroupedLinear")}
        stand_ins["TEDotProductAttention"] = te.TEDotProductAttention
        monkeypatch.setattr(backend, "te_modules", types.SimpleNamespace(**stand_ins))
    experts = experts_of(get_layer_spec(config(moma=grouped, moe_grouped_gemm=True)))
    assert experts.module is TEGroupedMLP
    assert experts.submodules.linear_fc1 is backend.te_modules.TEColumnParallelGroupedLinear
    assert experts.submodules.linear_fc2 is backend.te_modules.TERowParallelGroupedLinear


def test_te_refuses_the_torch_fp8_path(pretend_te):
    with pytest.raises(ValueError, match="with Transformer Engine set TransformerConfig.fp8"):
        get_layer_spec(config(moma=MOMA, expert_fp8=HYBRID))


def test_explicit_use_te_false_builds_local_modules_even_where_te_imports(pretend_te):
    experts = experts_of(get_layer_spec(config(moma=MOMA, moe_grouped_gemm=True), use_te=False))
    assert experts.module is GroupedExpertMLP
    assert not pretend_te, "the TE layer spec was consulted"
