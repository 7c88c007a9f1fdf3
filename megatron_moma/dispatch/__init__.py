"""Moving token rows to the experts that process them (and back) across expert-parallel ranks,
on the dispatch ops of megatron_moma.ops (csrc kernels or their pure-torch fallback)."""
