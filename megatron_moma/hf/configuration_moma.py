"""Configuration of a megatron-moma model exported to Hugging Face (`model_type` "megatron_moma").

Shipped verbatim in every exported model folder and loaded with `trust_remote_code=True`, so it
imports only the standard library and transformers. The fields mirror the `pretrain-moma` flags
that shape the model (Megatron-LM names where Hugging Face has no standard one) plus the
vocabulary layout that says which token ids belong to which modality.
"""

from typing import Any, Dict, List, Optional, Sequence

from transformers import PretrainedConfig

ARCHITECTURES = ("dense", "moma", "mot", "mot+moma")
MOMA_ROUTINGS = ("expert_choice", "token_choice")
MOT_COMPONENTS = ("attention", "ffn", "norms")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
POSITION_EMBEDDINGS = ("rope", "learned_absolute")


class MoMaConfig(PretrainedConfig):
    """A dense, MoMa, MoT or MoT+MoMa decoder, with Mixture-of-Depths on `mod_layers`.

    Args (beyond the usual Hugging Face ones):
        vocab_size: Megatron's padded vocabulary (embedding and output rows).
        intermediate_size: FFN hidden size (of every expert too).
        num_key_value_heads: query groups (GQA); equal to `num_attention_heads` without GQA.
        head_dim: Megatron's kv_channels.
        position_embedding_type: `rope` (rotary over the whole head, base `rotary_base`) or
            `learned_absolute` (a table of `max_position_embeddings` rows added to the embedding).
        normalization, norm_epsilon: `RMSNorm` or `LayerNorm` (with bias) and its epsilon.
        swiglu: SwiGLU FFNs (silu gate); otherwise GELU FFNs. MoT FFNs are always SwiGLU.
        add_bias_linear: biases on the attention and dense-MLP linears (never on MoT projections,
            MoMa experts or routers).
        qk_layernorm: normalise queries and keys over the head dimension.
        architecture: `dense`, `moma`, `mot` or `mot+moma`.
        modality_names: modality of each modality id, text (id 0) first.
        vocabulary: the vocabulary layout (`VocabularyLayout.to_dict()` of megatron-moma):
            `vocab_size` (unpadded), `ranges` [{name, first_id, last_id}] (every other id is
            text), `eod`, `pad`, `begin_of_image`, `end_of_image`.
        moma_experts_per_modality: experts of each modality's group, in `modality_names` order.
        moma_routing: `expert_choice` (routed causally by the auxiliary routers at inference) or
            `token_choice` (each token takes its top `moma_token_choice_topk` experts).
        moma_aux_router: whether expert-choice groups have auxiliary routers.
        mot_untie: MoT components with per-modality weights (`attention`, `ffn`, `norms`).
        mot_norm_placement: `pre` (x + f(norm(x))) or `post` (x + norm(f(x)), Chameleon's).
        mod_layers: 0-based Mixture-of-Depths layers; None without MoD.
        seq_length, moma_capacity_factor, moma_gumbel_noise, moma_aux_loss_coeff,
        moe_aux_loss_coeff, moe_z_loss_coeff, mod_capacity, mod_topk_scope, mod_aux_router,
        mod_aux_loss_coeff, hidden_dropout, attention_dropout,
        make_vocab_size_divisible_by: training settings kept so that the model can be imported
            back into Megatron unchanged; they do not change inference.
    """

    model_type = "megatron_moma"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 128,
        hidden_size: int = 64,
        intermediate_size: int = 256,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        max_position_embeddings: int = 2048,
        position_embedding_type: str = "rope",
        rotary_base: int = 10000,
        normalization: str = "RMSNorm",
        norm_epsilon: float = 1e-5,
        swiglu: bool = True,
        add_bias_linear: bool = False,
        qk_layernorm: bool = False,
        tie_word_embeddings: bool = True,
        initializer_range: float = 0.02,
        architecture: str = "dense",
        modality_names: Sequence[str] = ("text",),
        vocabulary: Optional[Dict[str, Any]] = None,
        moma_experts_per_modality: Optional[Sequence[int]] = None,
        moma_routing: str = "expert_choice",
        moma_token_choice_topk: int = 1,
        moma_aux_router: bool = True,
        moma_capacity_factor: float = 1.0,
        moma_gumbel_noise: bool = False,
        moma_aux_loss_coeff: float = 1.0,
        moe_aux_loss_coeff: float = 0.0,
        moe_z_loss_coeff: Optional[float] = None,
        mot_untie: Sequence[str] = MOT_COMPONENTS,
        mot_norm_placement: str = "pre",
        mod_layers: Optional[Sequence[int]] = None,
        mod_capacity: float = 0.25,
        mod_topk_scope: str = "batch",
        mod_aux_router: bool = True,
        mod_aux_loss_coeff: float = 1.0,
        seq_length: Optional[int] = None,
        hidden_dropout: float = 0.0,
        attention_dropout: float = 0.0,
        make_vocab_size_divisible_by: int = 128,
        use_cache: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.position_embedding_type = position_embedding_type
        self.rotary_base = rotary_base
        self.normalization = normalization
        self.norm_epsilon = norm_epsilon
        self.swiglu = swiglu
        self.add_bias_linear = add_bias_linear
        self.qk_layernorm = qk_layernorm
        self.tie_word_embeddings = tie_word_embeddings
        self.initializer_range = initializer_range
        self.architecture = architecture
        self.modality_names = list(modality_names)
        self.vocabulary = vocabulary or {"vocab_size": vocab_size, "ranges": [], "eod": 0}
        self.moma_experts_per_modality = (
            None if moma_experts_per_modality is None else list(moma_experts_per_modality))
        self.moma_routing = moma_routing
        self.moma_token_choice_topk = moma_token_choice_topk
        self.moma_aux_router = moma_aux_router
        self.moma_capacity_factor = moma_capacity_factor
        self.moma_gumbel_noise = moma_gumbel_noise
        self.moma_aux_loss_coeff = moma_aux_loss_coeff
        self.moe_aux_loss_coeff = moe_aux_loss_coeff
        self.moe_z_loss_coeff = moe_z_loss_coeff
        self.mot_untie = sorted(mot_untie)
        self.mot_norm_placement = mot_norm_placement
        self.mod_layers = None if mod_layers is None else sorted(mod_layers)
        self.mod_capacity = mod_capacity
        self.mod_topk_scope = mod_topk_scope
        self.mod_aux_router = mod_aux_router
        self.mod_aux_loss_coeff = mod_aux_loss_coeff
        self.seq_length = seq_length
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.make_vocab_size_divisible_by = make_vocab_size_divisible_by
        self.use_cache = use_cache
        self._check()
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def uses_moma(self) -> bool:
        return self.architecture in ("moma", "mot+moma")

    @property
    def uses_mot(self) -> bool:
        return self.architecture in ("mot", "mot+moma")

    def is_mod_layer(self, layer_idx: int) -> bool:
        return self.mod_layers is not None and layer_idx in self.mod_layers

    def modality_ranges(self) -> List[Dict[str, Any]]:
        """[{id, first_id, last_id}] of every non-text modality, in modality-id order."""
        by_name = {r["name"]: r for r in self.vocabulary["ranges"]}
        return [dict(id=i, first_id=by_name[name]["first_id"], last_id=by_name[name]["last_id"])
                for i, name in enumerate(self.modality_names) if i > 0]

    def _check(self) -> None:
        def require(condition: bool, message: str) -> None:
            if not condition:
                raise ValueError(f"MoMaConfig: {message}")

        require(self.architecture in ARCHITECTURES,
                f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        require(self.position_embedding_type in POSITION_EMBEDDINGS,
                f"position_embedding_type must be one of {POSITION_EMBEDDINGS}, "
                f"got {self.position_embedding_type!r}")
        require(self.normalization in NORMALIZATIONS,
                f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        require(self.num_attention_heads % self.num_key_value_heads == 0,
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}")
        require(self.modality_names[:1] == ["text"], f"modality_names must start with 'text', "
                f"got {self.modality_names}")
        # A range the model does not distinguish (moe_8x: one expert group over every modality)
        # is absent from modality_names, and its ids are routed as text.
        range_names = sorted(r["name"] for r in self.vocabulary["ranges"])
        require(set(self.modality_names[1:]) <= set(range_names),
                f"modality_names lists {self.modality_names[1:]} besides text, but the vocabulary "
                f"has id ranges for {range_names} only")
        require(set(self.mot_untie) <= set(MOT_COMPONENTS),
                f"mot_untie takes {MOT_COMPONENTS}, got {self.mot_untie}")
        require(self.mot_norm_placement in ("pre", "post"),
                f"mot_norm_placement must be 'pre' or 'post', got {self.mot_norm_placement!r}")
        require(not (self.uses_moma and self.uses_mot and self.mot_norm_placement == "post"),
                "MoT with MoMa MLPs supports mot_norm_placement='pre' only")
        if self.uses_moma:
            experts = self.moma_experts_per_modality or []
            require(len(experts) == len(self.modality_names) and min(experts) >= 1,
                    f"moma_experts_per_modality {experts} needs one group of >= 1 experts per "
                    f"modality {self.modality_names}")
            require(self.moma_routing in MOMA_ROUTINGS,
                    f"moma_routing must be one of {MOMA_ROUTINGS}, got {self.moma_routing!r}")
            require(self.moma_routing == "token_choice" or self.moma_aux_router
                    or max(experts) == 1,
                    "expert-choice MoMa needs auxiliary routers (moma_aux_router) for causal "
                    "inference")
        if self.mod_layers is not None:
            outside = [i for i in self.mod_layers if not 0 <= i < self.num_hidden_layers]
            require(not outside, f"mod_layers {outside} are not layers of a "
                    f"{self.num_hidden_layers}-layer model")
            require(self.mod_aux_router, "Mixture-of-Depths needs its auxiliary router "
                    "(mod_aux_router) for causal inference")
