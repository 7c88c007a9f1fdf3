"""Which implementation backs our layer specs: Transformer Engine where it imports, local
megatron-core modules otherwise (megatron-core's own BackendSpecProvider choice)."""

from typing import Optional

from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider


def transformer_engine_available() -> bool:
    from megatron.core.models.gpt import gpt_layer_specs

    return gpt_layer_specs.HAVE_TE


def resolve_use_te(use_te: Optional[bool]) -> bool:
    """`None` picks Transformer Engine when it imports; `True` without it is an error."""
    available = transformer_engine_available()
    if use_te and not available:
        raise RuntimeError(
            "Transformer Engine layer specs were requested but transformer_engine does not import "
            "here; install the [te] extra on a CUDA machine, or pass use_te=False"
        )
    return available if use_te is None else use_te


def backend_provider(use_te: bool) -> BackendSpecProvider:
    if use_te:
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    return LocalSpecProvider()
