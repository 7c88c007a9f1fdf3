"""Megatron <-> Hugging Face for megatron-moma models: the config and every tensor's name and layout.

The Megatron side is the `state_dict()` of a world-size-1 `ModalityGPTModel` built with the local
(non-Transformer-Engine) layer spec; the Hugging Face side is `MoMaForCausalLM`
(`modeling_moma.py`, shipped with every export). The README's "Hugging Face model" section lists
the name layout. Three conversions change a tensor's layout, all of them exact (copies and
reshapes, no arithmetic):

- `linear_qkv` (weight [g * (h/g + 2) * d, hidden] and bias): Megatron interleaves the fused
  projection per query group g: the group's h/g query heads, its key head, its value head. It
  becomes `q_proj` [h * d], `k_proj` [g * d], `v_proj` [g * d].
- `linear_fc1` under SwiGLU: [gate; up] stacked on the output axis -> `gate_proj`, `up_proj`.
- the auxiliary routers' bare parameters `linear_in`, `linear_out` -> `in_proj.weight`,
  `out_proj.weight`.

Every tensor of the input is used exactly once and every tensor of the output is produced:
anything missing, unexpected or of the wrong shape raises a ValueError that names it (a
converter that silently drops or invents expert weights still "loads", Megatron-LM issue #5844).
"""

import argparse
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Sequence, Tuple

import torch

from megatron_moma.data.vocabulary import VocabularyLayout
from megatron_moma.hf.configuration_moma import NORMALIZATIONS, POSITION_EMBEDDINGS, MoMaConfig
from megatron_moma.hf.modeling_moma import MoMaForCausalLM
from megatron_moma.training import configs
from megatron_moma.training.arguments import default_arguments

_HERE = os.path.dirname(os.path.abspath(__file__))
HF_MODEL_FILES: Tuple[str, ...] = (
    os.path.join(_HERE, "configuration_moma.py"),
    os.path.join(_HERE, "modeling_moma.py"),
)
"""The files to copy into an exported Hugging Face folder (self-contained remote code)."""

AUTO_MAP = {
    "AutoConfig": "configuration_moma.MoMaConfig",
    "AutoModelForCausalLM": "modeling_moma.MoMaForCausalLM",
}
"""`auto_map` of config.json: what `trust_remote_code=True` loads."""

SHARED = "shared"  # Megatron's name of a tied MoT component's single weight set


# ----------------------------------------------------------------------------- configs
# (flag dest, MoMaConfig field, negated): the flags that carry over one to one, by the option
# group that uses them ("model": every architecture).
_FLAG_FIELDS: Dict[str, Tuple[Tuple[str, str, bool], ...]] = {
    "model": (
        ("num_layers", "num_hidden_layers", False),
        ("hidden_size", "hidden_size", False),
        ("ffn_hidden_size", "intermediate_size", False),
        ("num_attention_heads", "num_attention_heads", False),
        ("kv_channels", "head_dim", False),
        ("max_position_embeddings", "max_position_embeddings", False),
        ("seq_length", "seq_length", False),
        ("position_embedding_type", "position_embedding_type", False),
        ("rotary_base", "rotary_base", False),
        ("normalization", "normalization", False),
        ("norm_epsilon", "norm_epsilon", False),
        ("swiglu", "swiglu", False),
        ("disable_bias_linear", "add_bias_linear", True),
        ("qk_layernorm", "qk_layernorm", False),
        ("untie_embeddings_and_output_weights", "tie_word_embeddings", True),
        ("make_vocab_size_divisible_by", "make_vocab_size_divisible_by", False),
        ("init_method_std", "initializer_range", False),
        ("hidden_dropout", "hidden_dropout", False),
        ("attention_dropout", "attention_dropout", False),
        ("architecture", "architecture", False),
    ),
    "moma": (
        ("moma_experts_per_modality", "moma_experts_per_modality", False),
        ("moma_routing", "moma_routing", False),
        ("moma_token_choice_topk", "moma_token_choice_topk", False),
        ("moma_no_aux_router", "moma_aux_router", True),
        ("moma_capacity_factor", "moma_capacity_factor", False),
        ("moma_gumbel_noise", "moma_gumbel_noise", False),
        ("moma_aux_loss_coeff", "moma_aux_loss_coeff", False),
        ("moe_aux_loss_coeff", "moe_aux_loss_coeff", False),
        ("moe_z_loss_coeff", "moe_z_loss_coeff", False),
    ),
    "mot": (
        ("mot_untie", "mot_untie", False),
        ("mot_norm_placement", "mot_norm_placement", False),
    ),
    "mod": (
        ("mod_capacity", "mod_capacity", False),
        ("mod_topk_scope", "mod_topk_scope", False),
        ("mod_no_aux_router", "mod_aux_router", True),
        ("mod_aux_loss_coeff", "mod_aux_loss_coeff", False),
    ),
}


def _flag_groups(architecture: str, mod: bool) -> List[str]:
    """The option groups a model uses; the others keep their defaults on both sides."""
    groups = ["model"] + [g for g in ("moma", "mot") if g in architecture]
    return groups + (["mod"] if mod else [])


def hf_config_from_run_config(run_config: Dict[str, Any]) -> MoMaConfig:
    """The Hugging Face config of the model a `pretrain_moma` run built.

    `run_config` is the run_config.json saved beside each checkpoint: `arguments` (every parsed
    flag), `vocabulary` (`VocabularyLayout.to_dict()`), `padded_vocab_size`, and optionally
    `architecture` (checked against the flags). Raises ValueError naming the flag for a model
    the Hugging Face model does not implement (expert choice or MoD without auxiliary routers,
    an unknown position embedding or norm).
    """
    # The parser's defaults first: a run config written before a flag existed lacks it.
    args = argparse.Namespace(**{**default_arguments(), **run_config["arguments"]})
    _check_supported(args)
    vocabulary = VocabularyLayout.from_dict(run_config["vocabulary"])
    # The model's own layout: the vocabulary's, or text alone for one expert group over every
    # modality (moe_8x), whose experts see every token whatever its modality.
    model = configs.transformer_config(args, vocabulary.modality_layout)  # validates the flags
    if run_config.get("architecture", model.architecture) != model.architecture:
        raise ValueError(f"run config: architecture {run_config['architecture']!r} does not match "
                         f"its flags (--architecture {args.architecture}, --mod {args.mod}), which "
                         f"build {model.architecture!r}")
    fields = {field: (not getattr(args, flag)) if negated else getattr(args, flag)
              for group in _flag_groups(args.architecture, args.mod)
              for flag, field, negated in _FLAG_FIELDS[group]}
    if model.mod is not None:
        fields["mod_layers"] = [i for i in range(model.num_layers) if model.mod.routes_layer(i)]
    return MoMaConfig(
        **fields,
        vocab_size=run_config["padded_vocab_size"],
        num_key_value_heads=model.num_query_groups,
        modality_names=list(model.modality_layout.names),
        vocabulary=vocabulary.to_dict(),
        **_special_tokens(vocabulary),
        architectures=[MoMaForCausalLM.__name__],
        auto_map=dict(AUTO_MAP),
    )


def _check_supported(args: argparse.Namespace) -> None:
    """ValueError for flag values the Hugging Face model does not implement."""
    for flag, value, supported in (
            ("--position-embedding-type", args.position_embedding_type, POSITION_EMBEDDINGS),
            ("--normalization", args.normalization, NORMALIZATIONS)):
        if value not in supported:
            raise ValueError(f"unsupported flag {flag} {value}: the Hugging Face model "
                             f"implements {', '.join(supported)}")
    routed = "moma" in args.architecture and max(args.moma_experts_per_modality) > 1
    if routed and args.moma_routing == "expert_choice" and args.moma_no_aux_router:
        raise ValueError("unsupported flag --moma-no-aux-router with --moma-routing expert_choice: "
                         "expert choice looks ahead, causal inference needs the auxiliary routers")
    if args.mod and args.mod_no_aux_router:
        raise ValueError("unsupported flag --mod-no-aux-router: Mixture-of-Depths top-k routing "
                         "looks ahead, causal inference needs the auxiliary router")


def _special_tokens(vocabulary: VocabularyLayout) -> Dict[str, int]:
    """Generation ids: documents end (and, with no BOS in Megatron's data, start) with EOD;
    padding is the vocabulary's pad id, or EOD."""
    eod = vocabulary.eod
    pad = eod if vocabulary.pad is None else vocabulary.pad
    return dict(bos_token_id=eod, eos_token_id=eod, pad_token_id=pad)


def run_arguments_from_hf_config(hf_config: MoMaConfig) -> Dict[str, Any]:
    """The `pretrain-moma` flag values (argparse dest names) of the model, plus `vocabulary`
    (`VocabularyLayout.to_dict()`) and `padded_vocab_size`: run_config.json's `arguments` are
    the parser's defaults overridden by these. Option groups the architecture does not use keep
    their defaults."""
    c = hf_config
    mod = c.mod_layers is not None
    arguments = {flag: (not getattr(c, field)) if negated else getattr(c, field)
                 for group in _flag_groups(c.architecture, mod)
                 for flag, field, negated in _FLAG_FIELDS[group]}
    gqa = c.num_key_value_heads != c.num_attention_heads
    arguments.update(
        seq_length=c.seq_length or c.max_position_embeddings,
        group_query_attention=gqa,
        num_query_groups=c.num_key_value_heads if gqa else 1,
        mod=mod,
        vocabulary=dict(c.vocabulary),
        padded_vocab_size=c.vocab_size,
    )
    if mod:
        arguments["mod_layers"] = list(c.mod_layers)
    return arguments


# ----------------------------------------------------------------------------- tensor layouts
Tensors = List[torch.Tensor]


@dataclass(frozen=True)
class Layout:
    """How Megatron tensors become Hugging Face tensors and back (exact inverses)."""

    to_hf: Callable[[Tensors, MoMaConfig], Tensors]
    to_megatron: Callable[[Tensors, MoMaConfig], Tensors]


def _qkv_groups(config: MoMaConfig) -> Tuple[int, int, int]:
    """(query groups, query heads per group, head dim)."""
    groups = config.num_key_value_heads
    return groups, config.num_attention_heads // groups, config.head_dim


def _split_qkv(tensors: Tensors, config: MoMaConfig) -> Tensors:
    """[g * (h/g + 2) * d, *rest] interleaved per group -> q [h * d, *rest], k, v [g * d, *rest]."""
    (fused,) = tensors
    groups, per_group, dim = _qkv_groups(config)
    rest = fused.shape[1:]
    grouped = fused.view(groups, per_group + 2, dim, *rest)
    return [grouped[:, :per_group].reshape(groups * per_group * dim, *rest).clone(),
            grouped[:, per_group].reshape(groups * dim, *rest).clone(),
            grouped[:, per_group + 1].reshape(groups * dim, *rest).clone()]


def _merge_qkv(tensors: Tensors, config: MoMaConfig) -> Tensors:
    q, k, v = tensors
    groups, per_group, dim = _qkv_groups(config)
    rest = q.shape[1:]
    grouped = torch.cat([q.reshape(groups, per_group, dim, *rest),
                         k.reshape(groups, 1, dim, *rest),
                         v.reshape(groups, 1, dim, *rest)], dim=1)
    return [grouped.reshape(groups * (per_group + 2) * dim, *rest)]


def _split_gate_up(tensors: Tensors, config: MoMaConfig) -> Tensors:
    """SwiGLU fc1 [2 * ffn, *rest] = [gate; up] -> gate [ffn, *rest], up [ffn, *rest]."""
    gate, up = tensors[0].chunk(2, dim=0)
    return [gate.clone(), up.clone()]


def _merge_gate_up(tensors: Tensors, config: MoMaConfig) -> Tensors:
    return [torch.cat(tensors, dim=0)]


COPY = Layout(lambda tensors, config: list(tensors), lambda tensors, config: list(tensors))
QKV = Layout(_split_qkv, _merge_qkv)
GATE_UP = Layout(_split_gate_up, _merge_gate_up)


@dataclass(frozen=True)
class TensorMapping:
    """Megatron tensors `megatron` <-> Hugging Face tensors `hf` through `layout`."""

    megatron: Tuple[str, ...]
    hf: Tuple[str, ...]
    layout: Layout = COPY


def _copy(megatron: str, hf: str) -> TensorMapping:
    return TensorMapping((megatron,), (hf,))


def _norm_params(config: MoMaConfig) -> Tuple[str, ...]:
    return ("weight",) if config.normalization == "RMSNorm" else ("weight", "bias")


def _linear_params(config: MoMaConfig) -> Tuple[str, ...]:
    return ("weight", "bias") if config.add_bias_linear else ("weight",)


def _weight_sets(config: MoMaConfig, untied: bool) -> List[Tuple[str, str]]:
    """(Megatron suffix, Hugging Face infix) of each weight set of a MoT component."""
    if untied:
        return [(name, f".{name}") for name in config.modality_names]
    return [(SHARED, "")]


def _norm(config: MoMaConfig, megatron: str, hf: str) -> List[TensorMapping]:
    return [_copy(f"{megatron}.{p}", f"{hf}.{p}") for p in _norm_params(config)]


def _mot_norm(config: MoMaConfig, megatron: str, hf: str, untied: bool) -> List[TensorMapping]:
    return [_copy(f"{megatron}.{p}.{suffix}", f"{hf}{infix}.{p}")
            for p in _norm_params(config) for suffix, infix in _weight_sets(config, untied)]


def _feed_forward(config: MoMaConfig, megatron: str, hf: str, params: Sequence[str]) -> List[TensorMapping]:
    """Megatron's MLP `{megatron}.linear_fc{1,2}` -> `{hf}.{gate,up,down}_proj`."""
    mappings = []
    for p in params:
        if config.swiglu:
            mappings.append(TensorMapping((f"{megatron}.linear_fc1.{p}",),
                                          (f"{hf}.gate_proj.{p}", f"{hf}.up_proj.{p}"), GATE_UP))
        else:
            mappings.append(_copy(f"{megatron}.linear_fc1.{p}", f"{hf}.up_proj.{p}"))
        mappings.append(_copy(f"{megatron}.linear_fc2.{p}", f"{hf}.down_proj.{p}"))
    return mappings


def _auxiliary_router(megatron: str, hf: str) -> List[TensorMapping]:
    return [_copy(f"{megatron}.linear_in", f"{hf}.in_proj.weight"),
            _copy(f"{megatron}.linear_out", f"{hf}.out_proj.weight")]


def _attention(config: MoMaConfig, m: str, h: str) -> List[TensorMapping]:
    """Megatron's SelfAttention (fused QKV) or MoTSelfAttention (per-modality projections)."""
    if not config.uses_mot:
        mappings = []
        for p in _linear_params(config):
            mappings.append(TensorMapping((f"{m}.linear_qkv.{p}",),
                                          tuple(f"{h}.{x}_proj.{p}" for x in "qkv"), QKV))
            mappings.append(_copy(f"{m}.linear_proj.{p}", f"{h}.o_proj.{p}"))
        if config.qk_layernorm:
            mappings += _norm(config, f"{m}.q_layernorm", f"{h}.q_norm")
            mappings += _norm(config, f"{m}.k_layernorm", f"{h}.k_norm")
        return mappings
    untied = "attention" in config.mot_untie
    mappings = [_copy(f"{m}.linear_{mp}.weight.{suffix}", f"{h}.{hp}{infix}.weight")
                for mp, hp in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("proj", "o_proj"))
                for suffix, infix in _weight_sets(config, untied)]
    if config.qk_layernorm:
        mappings += _mot_norm(config, f"{m}.q_layernorm", f"{h}.q_norm", untied)
        mappings += _mot_norm(config, f"{m}.k_layernorm", f"{h}.k_norm", untied)
    if config.mot_norm_placement == "post":
        mappings += _mot_norm(config, f"{m}.post_norm", f"{h}.output_norm", "norms" in config.mot_untie)
    return mappings


def _mlp(config: MoMaConfig, m: str, h: str) -> List[TensorMapping]:
    """MoMa MLP, MoT MLP or Megatron's dense MLP."""
    if config.uses_moma:
        mappings = []
        for name, experts in zip(config.modality_names, config.moma_experts_per_modality):
            if experts > 1:
                mappings.append(_copy(f"{m}.routers.{name}.weight", f"{h}.routers.{name}.weight"))
                if config.moma_routing == "expert_choice":
                    mappings += _auxiliary_router(f"{m}.aux_routers.{name}", f"{h}.aux_routers.{name}")
            for e in range(experts):
                mappings += _feed_forward(config, f"{m}.experts.{name}.local_experts.{e}",
                                          f"{h}.experts.{name}.{e}", ("weight",))
        return mappings
    if config.uses_mot:
        untied = "ffn" in config.mot_untie
        mappings = [_copy(f"{m}.linear_{part}.weight.{suffix}", f"{h}.{part}_proj{infix}.weight")
                    for part in ("gate", "up", "down") for suffix, infix in _weight_sets(config, untied)]
        if config.mot_norm_placement == "post":
            mappings += _mot_norm(config, f"{m}.post_norm", f"{h}.output_norm", "norms" in config.mot_untie)
        return mappings
    return _feed_forward(config, m, h, _linear_params(config))


def _layer(config: MoMaConfig, i: int) -> List[TensorMapping]:
    m, h = f"decoder.layers.{i}", f"model.layers.{i}"
    mappings = []
    if not config.uses_mot:
        mappings += _norm(config, f"{m}.input_layernorm", f"{h}.input_layernorm")
        mappings += _norm(config, f"{m}.pre_mlp_layernorm", f"{h}.post_attention_layernorm")
    elif config.mot_norm_placement == "pre":
        untied = "norms" in config.mot_untie
        mappings += _mot_norm(config, f"{m}.input_layernorm", f"{h}.input_layernorm", untied)
        mappings += _mot_norm(config, f"{m}.pre_mlp_layernorm", f"{h}.post_attention_layernorm", untied)
    mappings += _attention(config, f"{m}.self_attention", f"{h}.self_attn")
    mappings += _mlp(config, f"{m}.mlp", f"{h}.mlp")
    if config.is_mod_layer(i):
        mappings.append(_copy(f"{m}.mod_router.weight", f"{h}.mod_router.weight"))
        mappings += _auxiliary_router(f"{m}.mod_aux_router", f"{h}.mod_aux_router")
    return mappings


def tensor_mappings(hf_config: MoMaConfig) -> List[TensorMapping]:
    """Every tensor of the model: Megatron names <-> Hugging Face names."""
    c = hf_config
    mappings = [_copy("embedding.word_embeddings.weight", "model.embed_tokens.weight")]
    if c.position_embedding_type == "learned_absolute":
        mappings.append(_copy("embedding.position_embeddings.weight", "model.embed_positions.weight"))
    for i in range(c.num_hidden_layers):
        mappings += _layer(c, i)
    mappings += _norm(c, "decoder.final_layernorm", "model.norm")
    if not c.tie_word_embeddings:
        mappings.append(_copy("output_layer.weight", "lm_head.weight"))
    return mappings


# ----------------------------------------------------------------------------- conversions
def megatron_to_hf_state_dict(state_dict: Dict[str, torch.Tensor],
                              hf_config: MoMaConfig) -> Dict[str, torch.Tensor]:
    """A world-size-1 ModalityGPTModel's `state_dict()` -> MoMaForCausalLM's tensors (without
    `lm_head.weight` when tied). Keys ending in `_extra_state` are ignored."""
    mappings = tensor_mappings(hf_config)
    given = {k: v for k, v in state_dict.items() if not k.endswith("_extra_state")}
    _check_names("Megatron", given, [k for m in mappings for k in m.megatron])
    expected = _hf_tensors(hf_config, mappings)
    for mapping in mappings:
        reference = mapping.layout.to_megatron([expected[k] for k in mapping.hf], hf_config)
        _check_shapes("Megatron", {k: given[k] for k in mapping.megatron},
                      dict(zip(mapping.megatron, reference)))
    converted = {}
    for mapping in mappings:
        tensors = mapping.layout.to_hf([given[k] for k in mapping.megatron], hf_config)
        converted.update(zip(mapping.hf, tensors))
    return converted


def hf_to_megatron_state_dict(hf_state_dict: Dict[str, torch.Tensor],
                              hf_config: MoMaConfig) -> Dict[str, torch.Tensor]:
    """The exact inverse of `megatron_to_hf_state_dict`: loadable into the world-size-1
    ModalityGPTModel with `load_state_dict(strict=False)`, only `_extra_state` keys missing.
    A tied `lm_head.weight` may be present if it equals `model.embed_tokens.weight`."""
    mappings = tensor_mappings(hf_config)
    given = dict(hf_state_dict)
    if hf_config.tie_word_embeddings and "lm_head.weight" in given:
        head = given.pop("lm_head.weight")
        embedding = given.get("model.embed_tokens.weight")
        if embedding is None or not torch.equal(head, embedding):
            raise ValueError("Hugging Face lm_head.weight differs from model.embed_tokens.weight "
                             "but the config ties them (tie_word_embeddings)")
    _check_names("Hugging Face", given, [k for m in mappings for k in m.hf])
    _check_shapes("Hugging Face", given, _hf_tensors(hf_config, mappings))
    converted = {}
    for mapping in mappings:
        tensors = mapping.layout.to_megatron([given[k] for k in mapping.hf], hf_config)
        converted.update(zip(mapping.megatron, tensors))
    return converted


def _hf_tensors(hf_config: MoMaConfig, mappings: Iterable[TensorMapping]) -> Dict[str, torch.Tensor]:
    """MoMaForCausalLM's tensors on the meta device (shapes only), checked against `mappings`."""
    with torch.device("meta"):
        model = MoMaForCausalLM(hf_config)
    tensors = model.state_dict()
    if hf_config.tie_word_embeddings:
        tensors.pop("lm_head.weight")
    mapped = {k for m in mappings for k in m.hf}
    if mapped != set(tensors):
        raise RuntimeError(f"megatron_moma.hf: the mapping and modeling_moma disagree: mapped only "
                           f"{sorted(mapped - set(tensors))}, modeled only {sorted(set(tensors) - mapped)}")
    return tensors


def _check_names(side: str, given: Dict[str, torch.Tensor], expected: Sequence[str]) -> None:
    missing = [k for k in expected if k not in given]
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{side} state dict does not match the model of the config: "
                         f"missing {_listing(missing)}; unexpected {_listing(unexpected)}")


def _check_shapes(side: str, given: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> None:
    wrong = [f"{k} {tuple(given[k].shape)} (expected {tuple(expected[k].shape)})"
             for k in expected if given[k].shape != expected[k].shape]
    if wrong:
        raise ValueError(f"{side} tensors of the wrong shape for the config: {_listing(wrong)}")


def _listing(names: Sequence[str], limit: int = 20) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"
