"""The FLOPs counter against counts done by hand (megatron_moma/training/flops.py docstring).

Model: 2 layers, h = 32, 4 heads of 8 (h_q = h_kv = 32), SwiGLU FFN f = 64, seq 16, V = 128.
Per token and layer: projections 2*32*(32+64) + 2*32*32 = 8192; core attention 4*16*32 = 2048;
FFN 2*32*64*3 = 12288. Output layer 2*32*128 = 8192.
"""

import pytest
import torch.nn.functional as F

from megatron_moma.config import ModalityTransformerConfig, MoDOptions, MoMaOptions, MoTOptions
from megatron_moma.modality import ModalityLayout
from megatron_moma.training.flops import forward_flops_per_token, training_flops


def _config(**options):
    return ModalityTransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        modality_layout=ModalityLayout.text_and_image(64, 127), **options)


def _flops(**options):
    return forward_flops_per_token(_config(**options), vocab_size=128, seq_length=16)


DENSE = (8192 + 2048 + 12288) * 2 + 8192  # 53248


def test_dense_and_mot_match_the_hand_count():
    assert _flops() == {"text": DENSE, "image": DENSE}
    assert _flops(mot=MoTOptions()) == {"text": DENSE, "image": DENSE}


def test_moma_expert_choice_adds_routers_per_modality_group():
    # text group of 2: router 2*32*2 = 128, aux router 2*32*16 + 2*16*2 = 1088;
    # image group of 4: router 256, aux router 1024 + 128 = 1152; one expert pass per token.
    text = (8192 + 2048 + 12288 + 128 + 1088) * 2 + 8192
    image = (8192 + 2048 + 12288 + 256 + 1152) * 2 + 8192
    assert _flops(moma=MoMaOptions(experts_per_modality=(2, 4))) == {"text": text, "image": image}
    # 1t1i: no routers, every token through its modality's one expert: the dense count.
    assert _flops(moma=MoMaOptions(experts_per_modality=(1, 1))) == {"text": DENSE, "image": DENSE}
    # capacity factor 2: two expert passes per token on average.
    doubled = _flops(moma=MoMaOptions(experts_per_modality=(2, 4), capacity_factor=2.0))
    assert doubled["text"] == text + 2 * 12288


def test_moma_token_choice_counts_top_k_expert_passes():
    options = MoMaOptions(experts_per_modality=(2, 2), routing="token_choice", token_choice_topk=2)
    expected = (8192 + 2048 + 2 * 12288 + 128) * 2 + 8192
    assert _flops(moma=options) == {"text": expected, "image": expected}


def test_mod_layer_processes_its_capacity_share_over_a_shorter_sequence():
    # Layer 0 is MoD at c_d = 0.5: 0.5 * (8192 + 4*8*32 + 12288) + router 64 + aux router 1056.
    mod_layer = 0.5 * (8192 + 4 * 8 * 32 + 12288) + 64 + (2 * 32 * 16 + 2 * 16 * 1)
    expected = mod_layer + (8192 + 2048 + 12288) + 8192
    assert _flops(mod=MoDOptions(capacity=0.5)) == {"text": expected, "image": expected}


def test_training_step_is_three_forward_passes_over_the_tokens_of_each_modality():
    config = _config(moma=MoMaOptions(experts_per_modality=(2, 4)))
    per_token = forward_flops_per_token(config, 128, 16)
    total = training_flops(config, 128, 16, {"text": 10, "image": 6})
    assert total == pytest.approx(3 * (10 * per_token["text"] + 6 * per_token["image"]))
