"""Modality-aware Megatron modules: MoMa MLP, routers, auxiliary routers."""
