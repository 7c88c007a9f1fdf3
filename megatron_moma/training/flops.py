"""Model FLOPs per token, per modality, for every architecture (dense, MoMa, MoT, MoT+MoMa, +MoD).

Counted as 2 FLOPs per multiply-add of every matrix multiplication in the forward pass (norms,
activations, softmax and the embedding lookup are not counted), with Megatron-LM's convention for
core attention: QK^T and AV over the whole sequence (no causal halving), 2 x 2 x s x (heads x
head_dim) per token. A training step costs 3x the forward pass (backward = 2x forward), as in
Megatron-LM's throughput; the auxiliary-router stage is counted the same way.

Per layer and token of modality m:
- attention projections: 2 h (h_q + 2 h_kv) + 2 h_q h, with h_q = heads x kv_channels and
  h_kv = query_groups x kv_channels. MoT unties weights but keeps their shapes: same count.
- MLP: 2 h f x (3 with SwiGLU, else 2). MoMa, expert choice: each of the E_m experts of group m
  takes ceil(c_e n_m / E_m) of the n_m tokens, so c_e expert passes per token (rounding ignored),
  plus the router 2 h E_m and, when built, the auxiliary router 2 h (h/2) + 2 (h/2) E_m (groups of
  one expert have neither and pass every token once). Token choice: top-k expert passes + router.
- MoD layers: the c_d share of tokens goes through the layer, attending over c_d s tokens; every
  token pays the router 2 h and, when built, the auxiliary router 2 h (h/2) + 2 (h/2).
Output layer: 2 h V per token (V the padded vocabulary).
"""

from typing import Dict

from megatron_moma.config import ModalityTransformerConfig


def _attention(config: ModalityTransformerConfig, attended: float) -> float:
    h = config.hidden_size
    h_q = config.num_attention_heads * config.kv_channels
    h_kv = config.num_query_groups * config.kv_channels
    projections = 2 * h * (h_q + 2 * h_kv) + 2 * h_q * h
    return projections + 2 * 2 * attended * h_q


def _ffn(config: ModalityTransformerConfig, ffn_hidden_size: int) -> float:
    matrices = 3 if config.gated_linear_unit else 2
    return 2 * config.hidden_size * ffn_hidden_size * matrices


def _auxiliary_router(hidden_size: int, outputs: int) -> float:
    half = hidden_size // 2
    return 2 * hidden_size * half + 2 * half * outputs


def _mlp(config: ModalityTransformerConfig, modality: int) -> float:
    moma = config.moma
    if moma is None:
        return _ffn(config, config.ffn_hidden_size)
    experts = moma.experts_per_modality[modality]
    expert = _ffn(config, config.moe_ffn_hidden_size or config.ffn_hidden_size)
    if experts == 1:
        return expert
    router = 2 * config.hidden_size * experts
    if moma.routing == "token_choice":
        return moma.token_choice_topk * expert + router
    aux = _auxiliary_router(config.hidden_size, experts) if moma.aux_router else 0
    return moma.capacity_factor * expert + router + aux


def _layer(config: ModalityTransformerConfig, layer: int, modality: int, seq_length: int) -> float:
    mod = config.mod
    if mod is None or not mod.routes_layer(layer):
        return _attention(config, seq_length) + _mlp(config, modality)
    processed = mod.capacity
    inner = _attention(config, processed * seq_length) + _mlp(config, modality)
    aux = _auxiliary_router(config.hidden_size, 1) if mod.aux_router else 0
    return processed * inner + 2 * config.hidden_size + aux


def forward_flops_per_token(config: ModalityTransformerConfig, vocab_size: int,
                            seq_length: int) -> Dict[str, float]:
    """Forward FLOPs of one token of each modality, keyed by modality name (text first)."""
    output_layer = 2 * config.hidden_size * vocab_size
    return {
        name: output_layer + sum(_layer(config, layer, modality, seq_length)
                                 for layer in range(config.num_layers))
        for modality, name in enumerate(config.modality_layout.names)
    }


def training_flops(config: ModalityTransformerConfig, vocab_size: int, seq_length: int,
                   tokens_per_modality: Dict[str, float]) -> float:
    """FLOPs of a training step (forward + backward) over the given token counts per modality."""
    per_token = forward_flops_per_token(config, vocab_size, seq_length)
    return 3 * sum(per_token[name] * count for name, count in tokens_per_modality.items())
