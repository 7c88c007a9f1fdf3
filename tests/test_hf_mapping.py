"""Megatron <-> Hugging Face mapping (megatron_moma.hf.mapping) on real world-size-1 Megatron
models of every architecture: bit-exact tensor round trips, a converted-back state dict that loads
into Megatron and gives the same logits, every missing, unexpected or misshapen tensor named, and
config round trips through the flags.

`megatron_runs()` builds the Megatron models of `VARIANTS` once (one forked rank) and is shared
with tests/test_hf_model.py.
"""

import copy
import functools
import math
import sys
from dataclasses import dataclass
from typing import Dict, List

import pytest
import torch

from megatron_moma.data.vocabulary import VocabularyLayout
from megatron_moma.modality.layout import Modality
from megatron_moma.hf import mapping
from megatron_moma.testing.multiprocess import run_on_ranks
from megatron_moma.training.arguments import parse_args

VOCABULARY = VocabularyLayout(vocab_size=100, ranges=(Modality("image", 50, 89),), eod=0,
                              begin_of_image=1, end_of_image=2)
SEQ, BATCH = 12, 3
BASE_FLAGS = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
              "--ffn-hidden-size", "48", "--seq-length", "16", "--train-iters", "1", "--lr", "1e-3",
              "--data-path", "unused", "--device", "cpu", "--hidden-dropout", "0",
              "--attention-dropout", "0", "--moma-inference-routing", "aux",
              "--mod-inference-routing", "aux"]
MOMA = ["--disable-bias-linear"]
# Every architecture, and between them every model flag that changes the math: Megatron's
# defaults (LayerNorm, GELU, biases, learned absolute positions, tied output layer) in `dense`.
VARIANTS: Dict[str, List[str]] = {
    "dense": [],
    "moma": ["--architecture", "moma", *MOMA, "--moma-experts-per-modality", "2", "3", "--swiglu",
             "--normalization", "RMSNorm", "--position-embedding-type", "rope",
             "--untie-embeddings-and-output-weights", "--group-query-attention",
             "--num-query-groups", "2", "--kv-channels", "12"],
    "moma-token-choice": ["--architecture", "moma", *MOMA, "--moma-routing", "token_choice",
                          "--moma-experts-per-modality", "3", "2", "--moma-token-choice-topk", "2"],
    "moe_8x": ["--architecture", "moma", *MOMA, "--moma-experts-per-modality", "4"],
    "mot": ["--architecture", "mot", "--swiglu", "--normalization", "RMSNorm",
            "--position-embedding-type", "rope", "--qk-layernorm", "--group-query-attention",
            "--num-query-groups", "2", "--kv-channels", "16"],
    "mot+moma": ["--architecture", "mot+moma", *MOMA, "--swiglu", "--moma-experts-per-modality",
                 "2", "2", "--mot-untie", "attention", "norms", "--position-embedding-type", "rope",
                 "--untie-embeddings-and-output-weights"],
    "dense+mod": ["--mod", "--num-layers", "3", "--swiglu", "--normalization", "RMSNorm",
                  "--position-embedding-type", "rope"],
    "moma+mod": ["--architecture", "moma", *MOMA, "--mod", "--mod-layers", "1",
                 "--moma-experts-per-modality", "1", "2", "--swiglu", "--normalization", "RMSNorm"],
    "mot+mod": ["--architecture", "mot", "--mod", "--num-layers", "3", "--mot-norm-placement",
                "post", "--mot-untie", "attention", "ffn", "--qk-layernorm",
                "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights"],
    "dense-gqa-qk-layernorm": ["--swiglu", "--group-query-attention", "--num-query-groups", "2",
                               "--qk-layernorm", "--position-embedding-type", "rope",
                               "--untie-embeddings-and-output-weights"],
    "mot-post-norm": ["--architecture", "mot", "--mot-norm-placement", "post", "--normalization",
                      "RMSNorm", "--qk-layernorm"],
}


@dataclass
class MegatronRun:
    """One variant's Megatron model: its run config (as pretrain_moma saves it), state dict,
    an evaluation batch and the logits Megatron computes on it in eval mode."""

    run_config: dict
    state_dict: Dict[str, torch.Tensor]
    tokens: torch.Tensor  # [BATCH, SEQ]
    logits: torch.Tensor  # [BATCH, SEQ, padded vocabulary]
    losses: torch.Tensor  # [BATCH, SEQ - 1] Megatron's cross-entropy of each next token


def eval_batch() -> torch.Tensor:
    """[BATCH, SEQ] ids: text with an image inside, text only, an image with text after it."""
    generator = torch.Generator().manual_seed(3)
    text = lambda n: torch.randint(3, 50, (n,), generator=generator)  # noqa: E731
    image = lambda n: torch.randint(50, 90, (n,), generator=generator)  # noqa: E731
    begin, end = torch.tensor([VOCABULARY.begin_of_image]), torch.tensor([VOCABULARY.end_of_image])
    return torch.stack([
        torch.cat([text(3), begin, image(5), end, text(2)]),
        text(SEQ),
        torch.cat([begin, image(7), end, text(3)]),
    ])


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights whose activations stay O(1): matrices N(0, 1/fan_in), norm weights near 1, biases
    near 0. Routers and auxiliary routers then score tokens far from their 0.5 thresholds."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.dim() == 1:
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            else:
                param.copy_(noise / math.sqrt(param.shape[-1]))


def build_megatron(run_config_flags: List[str]):
    """This rank's world-size-1 ModalityGPTModel for the flags, as the trainer builds it."""
    from megatron_moma.models import build_gpt_model
    from megatron_moma.training import configs
    from megatron_moma.training.checkpointing import make_run_config

    args = parse_args(run_config_flags)
    padded = configs.padded_vocab_size(VOCABULARY.vocab_size, args)
    config = configs.transformer_config(args, VOCABULARY.modality_layout)
    model = build_gpt_model(
        config, padded, args.max_position_embeddings, use_te=False,
        position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights)
    return model, make_run_config(args, VOCABULARY, padded, config.architecture, world_size=1)


def megatron_logits(model, tokens: torch.Tensor, labels=None) -> torch.Tensor:
    """Eval-mode logits [b, s, vocab], or with `labels` [b, s] the per-token losses [b, s]."""
    model.eval()
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, attention_mask=None, labels=labels)


def _initialize():
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1)


def _build_runs(variants: Dict[str, List[str]]) -> Dict[str, MegatronRun]:
    _initialize()
    tokens = eval_batch()
    runs = {}
    for seed, (name, flags) in enumerate(variants.items()):
        model, run_config = build_megatron(BASE_FLAGS + flags)
        randomize(model, seed)
        state_dict = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        losses = megatron_logits(model, tokens[:, :-1], labels=tokens[:, 1:])
        runs[name] = MegatronRun(run_config, state_dict, tokens, megatron_logits(model, tokens), losses)
    return runs


@functools.lru_cache(maxsize=None)
def megatron_runs() -> Dict[str, MegatronRun]:
    """Every variant's Megatron run, built once per test session."""
    return run_on_ranks(_build_runs, 1, VARIANTS, timeout=300)[0]


def _load_back(name: str, state_dict: Dict[str, torch.Tensor]):
    """Load `state_dict` into a fresh Megatron model of variant `name`: (missing, unexpected, logits)."""
    _initialize()
    model, _ = build_megatron(BASE_FLAGS + VARIANTS[name])
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    return missing, unexpected, megatron_logits(model, eval_batch())


# ----------------------------------------------------------------------------- tensors
@pytest.mark.parametrize("name", VARIANTS)
def test_megatron_to_hf_to_megatron_is_bit_exact(name):
    run = megatron_runs()[name]
    config = mapping.hf_config_from_run_config(run.run_config)
    hf = mapping.megatron_to_hf_state_dict(run.state_dict, config)
    back = mapping.hf_to_megatron_state_dict(hf, config)
    original = {k: v for k, v in run.state_dict.items() if not k.endswith("_extra_state")}
    assert set(back) == set(original)
    for key, tensor in original.items():
        assert torch.equal(back[key], tensor), key
    # No tensor is dropped or invented on the way: as many elements on both sides.
    assert sum(t.numel() for t in hf.values()) == sum(t.numel() for t in original.values())


@pytest.mark.parametrize("name", ["moma+mod", "mot-post-norm", "dense-gqa-qk-layernorm"])
def test_converted_back_state_dict_loads_into_megatron_and_gives_the_same_logits(name):
    run = megatron_runs()[name]
    config = mapping.hf_config_from_run_config(run.run_config)
    back = mapping.hf_to_megatron_state_dict(mapping.megatron_to_hf_state_dict(run.state_dict, config),
                                             config)
    missing, unexpected, logits = run_on_ranks(_load_back, 1, name, back, timeout=120)[0]
    assert unexpected == []
    assert all(key.endswith("_extra_state") for key in missing)
    assert torch.equal(logits, run.logits)


def test_qkv_is_split_per_query_group():
    """Megatron's fused QKV rows per group g: its query heads, its key head, its value head."""
    run = megatron_runs()["dense-gqa-qk-layernorm"]  # 4 heads of 8, 2 groups
    config = mapping.hf_config_from_run_config(run.run_config)
    hf = mapping.megatron_to_hf_state_dict(run.state_dict, config)
    fused = run.state_dict["decoder.layers.1.self_attention.linear_qkv.weight"].view(2, 4, 8, 32)
    q = hf["model.layers.1.self_attn.q_proj.weight"].view(2, 2, 8, 32)  # [group, head, d, h]
    assert torch.equal(q, fused[:, :2])
    assert torch.equal(hf["model.layers.1.self_attn.k_proj.weight"].view(2, 8, 32), fused[:, 2])
    assert torch.equal(hf["model.layers.1.self_attn.v_proj.weight"].view(2, 8, 32), fused[:, 3])


def test_experts_and_modality_weights_keep_their_modality_and_index():
    run = megatron_runs()["moma"]
    config = mapping.hf_config_from_run_config(run.run_config)
    hf = mapping.megatron_to_hf_state_dict(run.state_dict, config)
    fc1 = run.state_dict["decoder.layers.0.mlp.experts.image.local_experts.2.linear_fc1.weight"]
    assert torch.equal(hf["model.layers.0.mlp.experts.image.2.gate_proj.weight"], fc1[:48])
    assert torch.equal(hf["model.layers.0.mlp.experts.image.2.up_proj.weight"], fc1[48:])
    assert torch.equal(hf["model.layers.0.mlp.aux_routers.text.out_proj.weight"],
                       run.state_dict["decoder.layers.0.mlp.aux_routers.text.linear_out"])
    mot = megatron_runs()["mot"]
    hf = mapping.megatron_to_hf_state_dict(mot.state_dict, mapping.hf_config_from_run_config(mot.run_config))
    assert torch.equal(hf["model.layers.1.self_attn.k_proj.image.weight"],
                       mot.state_dict["decoder.layers.1.self_attention.linear_k.weight.image"])


def _error(convert, state_dict, config) -> str:
    with pytest.raises(ValueError) as error:
        convert(state_dict, config)
    return str(error.value)


def test_missing_unexpected_or_misshapen_megatron_tensors_are_named():
    run = megatron_runs()["moma+mod"]
    config = mapping.hf_config_from_run_config(run.run_config)
    expert = "decoder.layers.1.mlp.experts.image.local_experts.1.linear_fc2.weight"
    missing = {k: v for k, v in run.state_dict.items() if k != expert}
    assert expert in _error(mapping.megatron_to_hf_state_dict, missing, config)
    extra_key = "decoder.layers.1.mlp.experts.image.local_experts.2.linear_fc2.weight"
    extra = dict(run.state_dict, **{extra_key: run.state_dict[expert]})
    assert extra_key in _error(mapping.megatron_to_hf_state_dict, extra, config)
    misshapen = dict(run.state_dict, **{expert: run.state_dict[expert][:, :10]})
    message = _error(mapping.megatron_to_hf_state_dict, misshapen, config)
    assert expert in message and "(32, 10)" in message


def test_missing_unexpected_or_misshapen_hf_tensors_are_named():
    run = megatron_runs()["mot+moma"]
    config = mapping.hf_config_from_run_config(run.run_config)
    hf = mapping.megatron_to_hf_state_dict(run.state_dict, config)
    router = "model.layers.0.mlp.aux_routers.image.in_proj.weight"
    assert router in _error(mapping.hf_to_megatron_state_dict,
                            {k: v for k, v in hf.items() if k != router}, config)
    extra_key = "model.layers.0.mlp.experts.image.2.down_proj.weight"
    assert extra_key in _error(mapping.hf_to_megatron_state_dict,
                               dict(hf, **{extra_key: hf["lm_head.weight"]}), config)
    query = "model.layers.1.self_attn.q_proj.text.weight"
    assert query in _error(mapping.hf_to_megatron_state_dict,
                           dict(hf, **{query: hf[query][:8]}), config)


def test_a_tied_output_layer_must_equal_the_embedding():
    run = megatron_runs()["dense"]
    config = mapping.hf_config_from_run_config(run.run_config)
    assert config.tie_word_embeddings
    hf = mapping.megatron_to_hf_state_dict(run.state_dict, config)
    assert "lm_head.weight" not in hf
    embedding = hf["model.embed_tokens.weight"]
    same = mapping.hf_to_megatron_state_dict(dict(hf, **{"lm_head.weight": embedding.clone()}), config)
    assert torch.equal(same["embedding.word_embeddings.weight"], embedding)
    message = _error(mapping.hf_to_megatron_state_dict,
                     dict(hf, **{"lm_head.weight": embedding + 1}), config)
    assert "lm_head.weight" in message


# ----------------------------------------------------------------------------- configs
def rebuilt_run_config(arguments: dict) -> dict:
    """run_config.json as the converter rebuilds it: parser defaults overridden by `arguments`."""
    flags = vars(parse_args(BASE_FLAGS))
    flags.update({k: v for k, v in arguments.items() if k not in ("vocabulary", "padded_vocab_size")})
    return {"arguments": flags, "vocabulary": arguments["vocabulary"],
            "padded_vocab_size": arguments["padded_vocab_size"]}


@pytest.mark.parametrize("name", VARIANTS)
def test_config_round_trips_through_the_run_arguments(name):
    config = mapping.hf_config_from_run_config(megatron_runs()[name].run_config)
    again = mapping.hf_config_from_run_config(
        rebuilt_run_config(mapping.run_arguments_from_hf_config(config)))
    assert again.to_dict() == config.to_dict()


def test_config_carries_the_vocabulary_and_generation_ids():
    config = mapping.hf_config_from_run_config(megatron_runs()["moma+mod"].run_config)
    assert config.vocab_size == 128 and config.vocabulary == VOCABULARY.to_dict()
    assert config.modality_names == ["text", "image"]
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (0, 0, 0)
    assert config.mod_layers == [1] and config.moma_experts_per_modality == [1, 2]
    assert config.auto_map == mapping.AUTO_MAP
    default_pattern = mapping.hf_config_from_run_config(megatron_runs()["mot+mod"].run_config)
    assert default_pattern.mod_layers == [0, 2]


@pytest.mark.parametrize("flag, value, variant", [
    ("moma_no_aux_router", True, "moma"),
    ("mod_no_aux_router", True, "dense+mod"),
    ("position_embedding_type", "alibi", "dense"),
])
def test_unsupported_flags_are_refused_by_name(flag, value, variant):
    run_config = copy.deepcopy(megatron_runs()[variant].run_config)
    run_config["arguments"][flag] = value
    with pytest.raises(ValueError, match="--" + flag.replace("_", "-")):
        mapping.hf_config_from_run_config(run_config)


def test_a_token_choice_model_needs_no_auxiliary_router():
    run_config = copy.deepcopy(megatron_runs()["moma-token-choice"].run_config)
    run_config["arguments"]["moma_no_aux_router"] = True
    assert mapping.hf_config_from_run_config(run_config).moma_routing == "token_choice"


def test_an_architecture_that_contradicts_the_flags_is_refused():
    run_config = copy.deepcopy(megatron_runs()["moma"].run_config)
    run_config["architecture"] = "mot"
    with pytest.raises(ValueError, match="architecture 'mot'"):
        mapping.hf_config_from_run_config(run_config)


def test_model_files_exist_and_are_self_contained():
    for path in mapping.HF_MODEL_FILES:
        with open(path, encoding="utf-8") as source:
            imports = [line.split()[1] for line in source
                       if line.startswith(("import ", "from "))]
        # The standard library, torch, transformers and the folder's own files ("" of ".x").
        allowed = set(sys.stdlib_module_names) | {"torch", "transformers", ""}
        assert all(name.split(".")[0] in allowed for name in imports), (path, imports)
