"""Hugging Face export and import of megatron-moma models.

`configuration_moma.py` and `modeling_moma.py` are the self-contained remote code shipped with
every exported model (torch and transformers only); `mapping.py` converts configs and tensors
between Megatron and Hugging Face. Import the submodules directly: this package imports nothing
so that loading the remote code never pulls in megatron-core.
"""
