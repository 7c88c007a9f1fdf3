"""Token-modality dispatch ops: bucket, permute, unpermute-combine (autograd), on the csrc
extension where it is built and a pure-torch fallback with the same interface elsewhere."""

from megatron_moma.ops.dispatch import DispatchLayout, bucket, permute, unpermute_combine
from megatron_moma.ops.kernels import backend_for

__all__ = ["DispatchLayout", "backend_for", "bucket", "permute", "unpermute_combine"]
