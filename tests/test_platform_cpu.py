"""megatron_moma.platform.cpu: each CPU stand-in against what CUDA would have done."""

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megatron_moma.platform import activate_platform, cpu
from megatron_moma.testing.multiprocess import run_on_ranks

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU platform only")


@pytest.fixture(scope="module", autouse=True)
def cpu_platform():
    assert activate_platform() == "gloo"
    assert cpu.is_active()


def test_every_patched_target_exists_in_installed_megatron_core():
    assert cpu.check_targets() == []


def test_activate_is_idempotent():
    assert cpu.activate() is True
    assert cpu.activate() is True


def test_activate_is_a_no_op_where_cuda_exists(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu.activate() is False
    assert activate_platform() == "nccl"


@pytest.mark.parametrize("device", ["cuda", "cuda:0", 0, torch.device("cuda")])
def test_cuda_device_requests_land_on_cpu(device):
    assert torch.zeros(2, device=device).device.type == "cpu"
    assert torch.tensor([1.0], device=device, pin_memory=True).device.type == "cpu"
    assert torch.ones(3).to(device).device.type == "cpu"


def test_current_device_allocations_land_on_cpu():
    tensor = torch.empty(4, device=torch.cuda.current_device())
    assert tensor.device.type == "cpu"


def test_tensor_cuda_returns_the_tensor_itself():
    tensor = torch.arange(3.0)
    assert tensor.cuda() is tensor
    assert torch.nn.Linear(2, 2).cuda().weight.device.type == "cpu"


@pytest.mark.parametrize(
    "dtype, name",
    [(torch.float32, "torch.cuda.FloatTensor"), (torch.float16, "torch.cuda.HalfTensor"),
     (torch.bfloat16, "torch.cuda.BFloat16Tensor")],
)
def test_tensor_type_reports_the_cuda_type_name(dtype, name):
    assert torch.zeros(1, dtype=dtype).type() == name


def test_tensor_type_conversion_to_a_cuda_name_converts_on_cpu():
    converted = torch.ones(2).type("torch.cuda.HalfTensor")
    assert converted.dtype == torch.float16 and converted.device.type == "cpu"


def test_streams_and_events_are_ordered_no_ops():
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        value = torch.ones(2) * 2
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    assert value.tolist() == [2.0, 2.0]


def test_rng_tracker_forks_the_cpu_generator_like_a_seeded_generator():
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    torch.manual_seed(0)
    tracker = CudaRNGStatesTracker()
    tracker.add("model-parallel-rng", 7)
    expected_default = torch.rand(3, generator=torch.Generator().manual_seed(0))
    with tracker.fork("model-parallel-rng"):
        forked_first = torch.rand(3)
    with tracker.fork("model-parallel-rng"):
        forked_second = torch.rand(3)
    reference = torch.Generator().manual_seed(7)
    torch.testing.assert_close(forked_first, torch.rand(3, generator=reference))
    torch.testing.assert_close(forked_second, torch.rand(3, generator=reference))
    # Adding and forking the tracked state left the default stream where it was.
    torch.testing.assert_close(torch.rand(3), expected_default)


def test_split_sizes_reach_gloo_as_host_integers():
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    for module in (moe_utils, token_dispatcher):
        sizes = module.maybe_move_tensor_to_cpu(torch.tensor([3, 1]), as_numpy=True)
        assert isinstance(sizes, np.ndarray) and sizes.tolist() == [3, 1]
        kept = torch.tensor([5])
        assert module.maybe_move_tensor_to_cpu(kept) is kept


def test_router_gemm_has_no_transformer_engine_reference():
    from megatron.core.transformer.moe import moe_utils

    assert moe_utils.te_general_gemm is None


def _gather_uneven_rows():
    from megatron.core.tensor_parallel import mappings

    rank = dist.get_rank()
    rows = torch.full((rank + 1, 3), float(rank)) + torch.arange(3.0)
    return mappings._gather_along_first_dim(rows, dist.group.WORLD, output_split_sizes=[1, 2])


def test_uneven_all_gather_equals_concatenation():
    expected = torch.cat([torch.full((1, 3), 0.0), torch.full((2, 3), 1.0)]) + torch.arange(3.0)
    for gathered in run_on_ranks(_gather_uneven_rows, 2, timeout=60):
        torch.testing.assert_close(gathered, expected)


def test_torch_norm_under_sequence_parallel_marks_its_weights_for_tp_all_reduce():
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    config = TransformerConfig(
        num_layers=1, hidden_size=8, num_attention_heads=2, normalization="RMSNorm",
        tensor_model_parallel_size=2, sequence_parallel=True, use_cpu_initialization=True,
    )
    norm = WrappedTorchNorm(config, 8)
    assert isinstance(norm, torch.nn.RMSNorm)
    assert all(getattr(p, "sequence_parallel", False) for p in norm.parameters())
    assert config.sequence_parallel, "the caller's config must not be changed"
