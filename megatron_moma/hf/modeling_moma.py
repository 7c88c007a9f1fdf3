"""Hugging Face model of megatron-moma checkpoints: dense, MoMa, MoT, MoT+MoMa, with or without
Mixture-of-Depths (docs/layers.md of megatron-moma), computing what Megatron computes in eval
mode with causal routing.

Shipped verbatim in every exported model folder and loaded with `trust_remote_code=True`, so it
imports only torch, transformers, the standard library and its configuration.

- A token's modality is a pure function of its id (the vocabulary layout in the config): each
  non-text modality owns an id range, every other id is text.
- MoT: the untied components (`config.mot_untie`) hold one weight per modality, applied to that
  modality's tokens; attention is one global causal attention over all tokens.
- MoMa: each modality's tokens reach only its own expert group. Expert choice routes a token to
  expert j iff its auxiliary router says a_j(x) > 0.5, weighted by the main router's
  s_j(x) = sigmoid(x W^T)_j; token choice takes the top-k experts of softmax(x W^T). A group of
  one expert takes every token of its modality with weight 1.
- Mixture-of-Depths: on the layers `config.mod_layers` a token goes through the layer iff its
  auxiliary router says > 0.5; inside, the chosen tokens of a sequence attend causally among
  themselves (at their original positions) and the token becomes x + r(x) (Layer(x) - x),
  r(x) = sigmoid(x w). Every decision depends on the token alone, so routing is causal.
- KV cache: `MoMaCache`, a transformers `Cache` whose MoD layers hold, per sequence, only the
  tokens that layer processed, so cached generation equals the full forward. The model takes it
  under the name the running transformers uses (`past_key_values`, or `cache` from 5.24 on) and
  returns it under that output field; an empty cache of another type (the `DynamicCache` that
  `generate` makes) is replaced by a `MoMaCache`.

The model is for inference and evaluation: dropout and the training-time routing rules
(expert choice over a whole batch, MoD top-k) and their auxiliary losses are not implemented.
"""

import dataclasses
import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_moma import MoMaConfig

# transformers 5.24 renamed the cache argument and output field from `past_key_values` to `cache`.
CACHE_FIELD = ("cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
               else "past_key_values")
KeyValueStore = Optional[Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]]


# ----------------------------------------------------------------------------- per-modality weights
class PerModality(nn.ModuleDict):
    """One module per modality (keys: modality names, in modality-id order), each applied to the
    tokens of its modality. Parameters are named `{module}.{modality}.{weight,bias}`."""

    def forward(self, x: torch.Tensor, modality_ids: torch.Tensor) -> torch.Tensor:
        """x [*lead, *features], modality_ids [*lead] -> [*lead, *out_features]."""
        lead = modality_ids.shape
        rows = x.reshape(modality_ids.numel(), *x.shape[modality_ids.dim():])
        ids = modality_ids.reshape(-1)
        order = torch.sort(ids, stable=True).indices
        counts = torch.bincount(ids, minlength=len(self)).tolist()
        parts = [module(part) for module, part in zip(self.values(), rows[order].split(counts))]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        out = torch.cat(parts)[inverse]
        return out.reshape(*lead, *out.shape[1:])


def per_modality(make: Callable[[], nn.Module], config: MoMaConfig, untied: bool) -> nn.Module:
    """`make()` shared by every token, or one per modality (`PerModality`) when untied."""
    if not untied:
        return make()
    return PerModality({name: make() for name in config.modality_names})


def apply(module: nn.Module, x: torch.Tensor, modality_ids: torch.Tensor) -> torch.Tensor:
    """Apply a shared module to every token, or a `PerModality` to each modality's tokens."""
    if isinstance(module, PerModality):
        return module(x, modality_ids)
    return module(x)


def make_norm(config: MoMaConfig, size: int) -> Callable[[], nn.Module]:
    if config.normalization == "RMSNorm":
        return lambda: nn.RMSNorm(size, eps=config.norm_epsilon)
    return lambda: nn.LayerNorm(size, eps=config.norm_epsilon)


def modality_ids_of(input_ids: torch.Tensor, config: MoMaConfig) -> torch.Tensor:
    """Modality id of every token id (0 text; i for the i-th range of `config.modality_names`)."""
    ids = torch.zeros_like(input_ids)
    for modality in config.modality_ranges():
        inside = (input_ids >= modality["first_id"]) & (input_ids <= modality["last_id"])
        ids = ids.masked_fill(inside, modality["id"])
    return ids


# ----------------------------------------------------------------------------- rotary embeddings
def rotary_cos_sin(position_ids: torch.Tensor, config: MoMaConfig, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """position_ids [b, s] -> cos, sin [b, s, head_dim] (Megatron's non-interleaved rotary)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rotary_base ** (
        torch.arange(0, dim, 2, dtype=torch.float32, device=position_ids.device) / dim))
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, heads, s, d], cos/sin [b, s, d]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]


# ----------------------------------------------------------------------------- KV cache
class MoDCacheLayer(CacheLayerMixin):
    """Cache of a Mixture-of-Depths layer: for each sequence of the batch, the keys and values
    [1, kv_heads, n_i, head_dim] of the n_i tokens this layer processed (n_i differs between
    sequences, so they are kept apart)."""

    is_croppable = False

    def __init__(self):
        super().__init__()
        self.is_initialized = False
        self.sequence_keys: Dict[int, torch.Tensor] = {}
        self.sequence_values: Dict[int, torch.Tensor] = {}

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, sequence: int = 0, *args, **kwargs):
        """Append the new tokens of batch row `sequence`; return all of that row's tokens."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if sequence in self.sequence_keys:
            key_states = torch.cat([self.sequence_keys[sequence], key_states], dim=-2)
            value_states = torch.cat([self.sequence_values[sequence], value_states], dim=-2)
        self.sequence_keys[sequence], self.sequence_values[sequence] = key_states, value_states
        return key_states, value_states

    def processed_tokens(self, sequence: int) -> int:
        keys = self.sequence_keys.get(sequence)
        return 0 if keys is None else keys.shape[-2]

    def get_seq_length(self) -> int:
        return max((self.processed_tokens(s) for s in self.sequence_keys), default=0)

    def get_mask_sizes(self, query_length: int) -> Tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        """No maximum (transformers 5.x name)."""
        return -1

    def get_max_cache_shape(self) -> int:
        """No maximum (transformers 4.x name)."""
        return -1

    def reset(self) -> None:
        self.sequence_keys, self.sequence_values = {}, {}
        self.is_initialized = False

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rearrange(indices.tolist())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rearrange(beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        rows = max(self.sequence_keys, default=-1) + 1
        self._rearrange([row for row in range(rows) for _ in range(repeats)])

    def _rearrange(self, source_rows) -> None:
        """New row i is old row source_rows[i]."""
        keys, values = self.sequence_keys, self.sequence_values
        self.sequence_keys = {i: keys[s] for i, s in enumerate(source_rows) if s in keys}
        self.sequence_values = {i: values[s] for i, s in enumerate(source_rows) if s in values}


class MoMaCache(Cache):
    """KV cache of a MoMa model: a `DynamicLayer` per ordinary layer ([b, kv_heads, t, d], every
    token) and a `MoDCacheLayer` per MoD layer (only the tokens it processed). `get_seq_length`
    is the number of positions the model has seen, whatever the layer."""

    def __init__(self, config: MoMaConfig):
        super().__init__(layers=[MoDCacheLayer() if config.is_mod_layer(i) else DynamicLayer()
                                 for i in range(config.num_hidden_layers)])
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("MoMaCache cannot be cropped: a Mixture-of-Depths layer does "
                                  "not know which positions its cached tokens came from")


# ----------------------------------------------------------------------------- sublayers
def causal_mask(query_length: int, past_length: int, device) -> torch.Tensor:
    """[1, 1, q, past + q] bool: query i sees keys 0 .. past + i."""
    keys = torch.arange(past_length + query_length, device=device)
    queries = torch.arange(query_length, device=device) + past_length
    return (keys[None, :] <= queries[:, None])[None, None]


def self_only_mask(query_length: int, past_length: int, device) -> torch.Tensor:
    """[1, 1, q, past + q] bool: query i sees key past + i (itself) only."""
    keys = torch.arange(past_length + query_length, device=device)
    queries = torch.arange(query_length, device=device) + past_length
    return (keys[None, :] == queries[:, None])[None, None]


class MoMaAttention(nn.Module):
    """Causal self-attention with per-modality Q/K/V/O (and QK-norms) where MoT unties them,
    GQA, optional QK-norm, rotary embeddings, and MoT's post-norm (`output_norm`)."""

    def __init__(self, config: MoMaConfig):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        untied = config.uses_mot and "attention" in config.mot_untie
        bias = config.add_bias_linear and not config.uses_mot

        def linear(inputs, outputs):
            return per_modality(lambda: nn.Linear(inputs, outputs, bias=bias), config, untied)

        self.q_proj = linear(h, self.heads * d)
        self.k_proj = linear(h, self.kv_heads * d)
        self.v_proj = linear(h, self.kv_heads * d)
        self.o_proj = linear(self.heads * d, h)
        self.q_norm = self.k_norm = self.output_norm = None
        if config.qk_layernorm:
            self.q_norm = per_modality(make_norm(config, d), config, untied)
            self.k_norm = per_modality(make_norm(config, d), config, untied)
        if config.uses_mot and config.mot_norm_placement == "post":
            self.output_norm = per_modality(make_norm(config, h), config, "norms" in config.mot_untie)

    def forward(self, x, modality_ids, rotary, mask, store: KeyValueStore) -> torch.Tensor:
        """x [b, s, h], modality_ids [b, s], rotary (cos, sin) [b, s, d] or None,
        mask [b or 1, 1, s, t] (True: may attend), store(k, v) -> all cached k, v -> [b, s, h]."""
        b, s, _ = x.shape
        q = apply(self.q_proj, x, modality_ids).view(b, s, self.heads, self.head_dim)
        k = apply(self.k_proj, x, modality_ids).view(b, s, self.kv_heads, self.head_dim)
        v = apply(self.v_proj, x, modality_ids).view(b, s, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = apply(self.q_norm, q, modality_ids)
            k = apply(self.k_norm, k, modality_ids)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads, s, d]
        if rotary is not None:
            q, k = rotate(q, *rotary), rotate(k, *rotary)
        if store is not None:
            k, v = store(k, v)
        groups = self.heads // self.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        context = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, self.heads * self.head_dim)
        out = apply(self.o_proj, context, modality_ids)
        if self.output_norm is not None:
            out = apply(self.output_norm, out, modality_ids)
        return out


class FeedForward(nn.Module):
    """down(silu(gate(x)) * up(x)) (SwiGLU) or down(gelu(up(x))), tokens [*, h] -> [*, h]; with
    `untied`, one set of weights per modality (MoT)."""

    def __init__(self, config: MoMaConfig, swiglu: bool, bias: bool, untied: bool = False):
        super().__init__()
        h, ffn = config.hidden_size, config.intermediate_size
        self.gate_proj = per_modality(lambda: nn.Linear(h, ffn, bias=bias), config, untied) if swiglu else None
        self.up_proj = per_modality(lambda: nn.Linear(h, ffn, bias=bias), config, untied)
        self.down_proj = per_modality(lambda: nn.Linear(ffn, h, bias=bias), config, untied)

    def forward(self, x: torch.Tensor, modality_ids: torch.Tensor) -> torch.Tensor:
        up = apply(self.up_proj, x, modality_ids)
        if self.gate_proj is None:
            return apply(self.down_proj, F.gelu(up), modality_ids)
        return apply(self.down_proj, F.silu(apply(self.gate_proj, x, modality_ids)) * up, modality_ids)


class MoTMLP(FeedForward):
    """MoT's FFN: SwiGLU without biases, per modality when `ffn` is untied, and the post-norm
    `output_norm` under post-norm placement."""

    def __init__(self, config: MoMaConfig):
        super().__init__(config, swiglu=True, bias=False, untied="ffn" in config.mot_untie)
        self.output_norm = None
        if config.mot_norm_placement == "post":
            self.output_norm = per_modality(make_norm(config, config.hidden_size), config,
                                            "norms" in config.mot_untie)

    def forward(self, x, modality_ids):
        out = super().forward(x, modality_ids)
        return out if self.output_norm is None else apply(self.output_norm, out, modality_ids)


class AuxiliaryRouter(nn.Module):
    """a(x) = sigmoid(out_proj(silu(in_proj(x)))), h -> h/2 -> outputs; says yes iff > 0.5."""

    def __init__(self, hidden_size: int, outputs: int):
        super().__init__()
        self.in_proj = nn.Linear(hidden_size, hidden_size // 2, bias=False)
        self.out_proj = nn.Linear(hidden_size // 2, outputs, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.out_proj(F.silu(self.in_proj(x))))


class MoMaMLP(nn.Module):
    """Per-modality expert groups. `experts.{modality}.{j}` are FFNs; groups of more than one
    expert have `routers.{modality}` (and `aux_routers.{modality}` under expert choice)."""

    def __init__(self, config: MoMaConfig):
        super().__init__()
        self.config = config
        sizes = dict(zip(config.modality_names, config.moma_experts_per_modality))
        routed = [name for name, n in sizes.items() if n > 1]
        h = config.hidden_size
        self.experts = nn.ModuleDict({
            name: nn.ModuleList(FeedForward(config, config.swiglu, bias=False) for _ in range(n))
            for name, n in sizes.items()})
        self.routers = nn.ModuleDict({name: nn.Linear(h, sizes[name], bias=False) for name in routed})
        self.expert_choice = config.moma_routing == "expert_choice"
        self.aux_routers = nn.ModuleDict({name: AuxiliaryRouter(h, sizes[name]) for name in routed}
                                         ) if self.expert_choice and routed else None

    def forward(self, x: torch.Tensor, modality_ids: torch.Tensor) -> torch.Tensor:
        """x [*, h], modality_ids [*] -> [*, h]: each token's weighted sum over its experts."""
        rows = x.reshape(-1, x.shape[-1])
        ids = modality_ids.reshape(-1)
        out = torch.zeros_like(rows)
        for modality, name in enumerate(self.config.modality_names):
            where = (ids == modality).nonzero().squeeze(-1)
            if where.numel() == 0:
                continue
            tokens, experts = rows[where], self.experts[name]
            if len(experts) == 1:
                out[where] = experts[0](tokens, ids[where])
                continue
            taken, weight = self._route(name, tokens)
            group_out = torch.zeros_like(tokens)
            for j, expert in enumerate(experts):
                chosen = taken[:, j].nonzero().squeeze(-1)
                if chosen.numel():
                    group_out[chosen] += weight[chosen, j, None] * expert(tokens[chosen], ids[where][chosen])
            out[where] = group_out
        return out.view_as(x)

    def _route(self, name: str, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """tokens [n, h] -> (taken [n, E] bool, weight [n, E])."""
        logits = self.routers[name](tokens)
        if self.expert_choice:
            return self.aux_routers[name](tokens) > 0.5, torch.sigmoid(logits)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(logits.dtype)
        top = torch.topk(probs, k=self.config.moma_token_choice_topk, dim=-1).indices
        taken = torch.zeros_like(probs, dtype=torch.bool).scatter(1, top, True)
        return taken, probs


class MoMaDecoderLayer(nn.Module):
    """Megatron's transformer layer (pre-norm, or MoT post-norm) with a dense, MoT or MoMa MLP;
    on MoD layers, only the tokens the auxiliary router picks go through it."""

    def __init__(self, config: MoMaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        pre_norm = not (config.uses_mot and config.mot_norm_placement == "post")
        norms_untied = config.uses_mot and "norms" in config.mot_untie
        norm = make_norm(config, config.hidden_size)
        self.input_layernorm = per_modality(norm, config, norms_untied) if pre_norm else None
        self.self_attn = MoMaAttention(config)
        self.post_attention_layernorm = per_modality(norm, config, norms_untied) if pre_norm else None
        if config.uses_moma:
            self.mlp = MoMaMLP(config)
        elif config.uses_mot:
            self.mlp = MoTMLP(config)
        else:
            self.mlp = FeedForward(config, config.swiglu, bias=config.add_bias_linear)
        self.mod_router = self.mod_aux_router = None
        if config.is_mod_layer(layer_idx):
            self.mod_router = nn.Linear(config.hidden_size, 1, bias=False)
            self.mod_aux_router = AuxiliaryRouter(config.hidden_size, 1)

    def forward(self, x, modality_ids, rotary, mask, new_tokens, cache: Optional[MoMaCache]):
        """x [b, s, h]; new_tokens [b, s] bool (False: padding); -> [b, s, h]."""
        if self.mod_router is None:
            store = None if cache is None else (lambda k, v: cache.update(k, v, self.layer_idx))
            return self._layer(x, modality_ids, rotary, mask, store)
        return self._mixture_of_depths(x, modality_ids, rotary, new_tokens, cache)

    def _layer(self, x, modality_ids, rotary, mask, store: KeyValueStore):
        hidden = x if self.input_layernorm is None else apply(self.input_layernorm, x, modality_ids)
        x = x + self.self_attn(hidden, modality_ids, rotary, mask, store)
        hidden = x if self.post_attention_layernorm is None else apply(
            self.post_attention_layernorm, x, modality_ids)
        return x + self.mlp(hidden, modality_ids)

    def _mixture_of_depths(self, x, modality_ids, rotary, new_tokens, cache):
        """Sequence by sequence: the chosen tokens [1, k, h] go through the layer."""
        scores = torch.sigmoid(self.mod_router(x)).squeeze(-1)  # [b, s]
        taken = (self.mod_aux_router(x).squeeze(-1) > 0.5) & new_tokens
        out = x.clone()
        layer_cache = None if cache is None else cache.layers[self.layer_idx]
        for row in range(x.shape[0]):
            chosen = taken[row].nonzero().squeeze(-1)
            if chosen.numel() == 0:
                continue
            tokens = x[row, chosen][None]
            past = 0 if layer_cache is None else layer_cache.processed_tokens(row)
            store = None if layer_cache is None else (
                lambda k, v, row=row: layer_cache.update(k, v, row))
            rows_rotary = None if rotary is None else tuple(t[row, chosen][None] for t in rotary)
            processed = self._layer(tokens, modality_ids[row, chosen][None], rows_rotary,
                                    causal_mask(chosen.numel(), past, x.device), store)
            weight = scores[row, chosen, None].to(x.dtype)
            out[row, chosen] = tokens[0] + weight * (processed[0] - tokens[0])
        return out


# ----------------------------------------------------------------------------- models
class MoMaPreTrainedModel(PreTrainedModel):
    config_class = MoMaConfig
    base_model_prefix = "model"
    _no_split_modules = ["MoMaDecoderLayer"]
    _skip_keys_device_placement = [CACHE_FIELD]
    supports_gradient_checkpointing = False


class MoMaModel(MoMaPreTrainedModel):
    """Embeddings, decoder layers and the final norm; hidden states [b, s, h]."""

    def __init__(self, config: MoMaConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = None
        if config.position_embedding_type == "learned_absolute":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(MoMaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config, config.hidden_size)()
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids: Optional[torch.LongTensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None,
                past_key_values: Optional[Cache] = None,
                inputs_embeds: Optional[torch.Tensor] = None,
                use_cache: Optional[bool] = None,
                cache: Optional[Cache] = None, **kwargs) -> BaseModelOutputWithPast:
        """input_ids [b, s]; attention_mask [b, past + s] (0: padding); position_ids [b, s];
        the cache as `past_key_values` or `cache` (either name, not both)."""
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("MoMa models take input_ids (not inputs_embeds): a token's modality "
                             "comes from its id")
        if past_key_values is not None and cache is not None:
            raise ValueError("pass the cache as `past_key_values` or as `cache`, not both")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = self._cache(cache if cache is not None else past_key_values, use_cache)
        b, s = input_ids.shape
        past = 0 if cache is None else cache.get_seq_length()
        device = input_ids.device
        if position_ids is None:
            position_ids = torch.arange(past, past + s, device=device)[None].expand(b, s)
        valid = torch.ones(b, past + s, dtype=torch.bool, device=device)
        if attention_mask is not None:
            if attention_mask.shape != (b, past + s):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                                 f"expected {(b, past + s)} (cached + new tokens)")
            valid = attention_mask.bool()
        # A padding query sees itself as well, so that no row of the softmax is empty.
        mask = (causal_mask(s, past, device) & valid[:, None, None, :]) | self_only_mask(s, past, device)
        modality_ids = modality_ids_of(input_ids, self.config)
        x = self.embed_tokens(input_ids)
        if self.embed_positions is not None:
            x = x + self.embed_positions(position_ids)
        rotary = None
        if self.config.position_embedding_type == "rope":
            rotary = rotary_cos_sin(position_ids, self.config, x.dtype)
        for layer in self.layers:
            x = layer(x, modality_ids, rotary, mask, valid[:, past:], cache)
        if cache is not None:
            cache.seen_tokens += s
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), **{CACHE_FIELD: cache})

    def _cache(self, given: Optional[Cache], use_cache: bool) -> Optional[MoMaCache]:
        if isinstance(given, MoMaCache):
            return given
        if given is not None and given.get_seq_length() > 0:
            raise TypeError(f"MoMa models keep their keys and values in a MoMaCache, got a filled "
                            f"{type(given).__name__}")
        return MoMaCache(self.config) if use_cache or given is not None else None


class MoMaForCausalLM(MoMaPreTrainedModel, GenerationMixin):
    """`MoMaModel` and the output layer (`lm_head`, tied to `embed_tokens` when
    `config.tie_word_embeddings`); logits [b, s, vocab_size] over Megatron's padded vocabulary."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoMaConfig):
        super().__init__(config)
        self.model = MoMaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids: Optional[torch.LongTensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None,
                past_key_values: Optional[Cache] = None,
                inputs_embeds: Optional[torch.Tensor] = None,
                labels: Optional[torch.LongTensor] = None,
                use_cache: Optional[bool] = None,
                logits_to_keep: int = 0,
                cache: Optional[Cache] = None, **kwargs) -> CausalLMOutputWithPast:
        """Logits [b, s, vocab] (the last `logits_to_keep` positions if > 0); with `labels`
        [b, s], the mean next-token cross-entropy; the cache as `past_key_values` or `cache`."""
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, past_key_values=past_key_values,
                             inputs_embeds=inputs_embeds, use_cache=use_cache, cache=cache)
        hidden = outputs.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)})
