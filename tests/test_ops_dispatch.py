"""Dispatch ops (bucket, permute, unpermute-combine) against an independent pure-torch
reference, forward and backward, on every backend this build has: the C++ kernels, the pure-torch
fallback, and the CUDA kernels (marked gpu). The C++ kernels and the fallback must agree exactly.
"""

import os
import subprocess
import sys

import pytest
import torch

from megatron_moma.ops import bucket, kernels, permute, torch_kernels, unpermute_combine

HAS_EXTENSION = kernels.extension is not None
needs_extension = pytest.mark.skipif(not HAS_EXTENSION, reason="megatron_moma._csrc not built")


@pytest.fixture(params=["cpp", "torch"])
def backend(request, monkeypatch):
    """Run the test on the C++ kernels, then on the pure-torch fallback."""
    if request.param == "cpp" and not HAS_EXTENSION:
        pytest.skip("megatron_moma._csrc not built")
    if request.param == "torch":
        monkeypatch.setattr(kernels, "extension", None)
    return request.param


def expert_choice_selection(num_tokens, num_buckets, per_bucket, generator):
    """Each bucket takes `per_bucket` distinct tokens (so a token can be taken several times),
    shuffled across buckets; -> token_of_row [R], bucket_of_row [R]."""
    taken = min(per_bucket, num_tokens)
    token = torch.cat([torch.randperm(num_tokens, generator=generator)[:taken]
                       for _ in range(num_buckets)])
    bucket_of_row = torch.arange(num_buckets).repeat_interleave(taken)
    shuffle = torch.randperm(token.numel(), generator=generator)
    return token[shuffle], bucket_of_row[shuffle]


def reference_layout(token_of_row, bucket_of_row, num_buckets):
    """Rows sorted by bucket with a Python stable sort (independent of the kernels)."""
    order = sorted(range(token_of_row.numel()), key=lambda i: int(bucket_of_row[i]))
    counts = [int((bucket_of_row == b).sum()) for b in range(num_buckets)]
    return torch.tensor(order, dtype=torch.long), torch.tensor(counts, dtype=torch.long)


def reference_combine(rows, weight, source_token, num_tokens):
    """out[t] = sum of weight[p] * rows[p] over p with source_token[p] == t, in fp64."""
    out = torch.zeros(num_tokens, rows.shape[1], dtype=torch.float64)
    for p in range(rows.shape[0]):
        out[source_token[p]] += weight[p].double() * rows[p].double()
    return out


SHAPES = [
    # (tokens, hidden, buckets, rows taken per bucket)
    (37, 24, 4, 12),   # duplicates: 48 rows from 37 tokens
    (16, 8, 3, 16),    # every bucket takes every token
    (20, 13, 5, 0),    # empty buckets, no rows at all; odd hidden size
    (0, 8, 2, 4),      # zero tokens
]


@pytest.mark.parametrize("num_tokens,hidden,num_buckets,per_bucket", SHAPES)
def test_bucket_matches_a_python_stable_sort(backend, num_tokens, hidden, num_buckets, per_bucket):
    generator = torch.Generator().manual_seed(0)
    token, bucket_of_row = expert_choice_selection(num_tokens, num_buckets, per_bucket, generator)
    layout = bucket(token, bucket_of_row, num_tokens, num_buckets)
    order, counts = reference_layout(token, bucket_of_row, num_buckets)
    assert torch.equal(layout.order, order)
    assert torch.equal(layout.counts, counts)
    assert torch.equal(layout.position[layout.order], torch.arange(token.numel()))
    assert torch.equal(layout.source_token, token[order])
    for t in range(num_tokens):
        copies = layout.positions_by_token[layout.token_offsets[t]:layout.token_offsets[t + 1]]
        assert copies.tolist() == (layout.source_token == t).nonzero().flatten().tolist()


@pytest.mark.parametrize("dtype,tolerance", [
    (torch.float32, dict(rtol=1e-6, atol=1e-6)),
    (torch.bfloat16, dict(rtol=1e-2, atol=1e-2)),
])
@pytest.mark.parametrize("num_tokens,hidden,num_buckets,per_bucket", SHAPES)
def test_permute_and_combine_forward_backward(backend, dtype, tolerance, num_tokens, hidden,
                                              num_buckets, per_bucket):
    generator = torch.Generator().manual_seed(1)
    token, bucket_of_row = expert_choice_selection(num_tokens, num_buckets, per_bucket, generator)
    layout = bucket(token, bucket_of_row, num_tokens, num_buckets)
    # Non-contiguous inputs: every other column of a wider tensor.
    tokens = torch.randn(num_tokens, 2 * hidden, generator=generator)[:, ::2].to(dtype)
    tokens.requires_grad_(True)
    weight = torch.rand(token.numel(), generator=generator, requires_grad=True)

    rows = permute(tokens, layout)
    assert torch.equal(rows, tokens.detach()[layout.source_token])
    expert_rows = rows * 2 + 1  # stands in for the experts
    out = unpermute_combine(expert_rows, weight, layout)
    expected = reference_combine(expert_rows.detach(), weight.detach(), layout.source_token,
                                 num_tokens)
    torch.testing.assert_close(out.double(), expected, **tolerance)

    grad_out = torch.randn(num_tokens, hidden, generator=generator).to(dtype)
    out.backward(grad_out)
    # d out[t] / d tokens[t] = 2 * (sum of the weights of t's copies); d out / d weight[p] =
    # <expert_rows[p], grad_out[t]>.
    weight_sum = torch.zeros(num_tokens, dtype=torch.float64).index_add_(
        0, layout.source_token, weight.detach().double())
    torch.testing.assert_close(tokens.grad.double(), 2 * weight_sum[:, None] * grad_out.double(),
                               **tolerance)
    expected_weight_grad = (expert_rows.detach().double()
                            * grad_out.double()[layout.source_token]).sum(-1)
    # Computed in fp32 from the same (bf16) values: only the summation order differs.
    torch.testing.assert_close(weight.grad.double(), expected_weight_grad, rtol=1e-5, atol=1e-5)


def test_unweighted_combine_is_the_inverse_of_a_permutation(backend):
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randn(30, 16, generator=generator, requires_grad=True)
    layout = bucket(torch.arange(30), torch.randint(0, 5, (30,), generator=generator), 30, 5)
    rows = permute(tokens, layout)
    back = unpermute_combine(rows * 3, None, layout)
    torch.testing.assert_close(back, tokens.detach() * 3, rtol=0, atol=0)
    back.sum().backward()
    torch.testing.assert_close(tokens.grad, torch.full_like(tokens, 3.0))


def test_gradcheck_fp64(backend):
    generator = torch.Generator().manual_seed(3)
    token, bucket_of_row = expert_choice_selection(9, 3, 5, generator)
    layout = bucket(token, bucket_of_row, 10, 3)  # token 9 never chosen
    tokens = torch.randn(10, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.rand(token.numel(), dtype=torch.float64, generator=generator, requires_grad=True)

    def dispatch_and_combine(tokens, weight):
        return unpermute_combine(permute(tokens, layout).tanh(), weight, layout)

    assert torch.autograd.gradcheck(dispatch_and_combine, (tokens, weight))


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpp_kernels_equal_the_fallback(dtype):
    generator = torch.Generator().manual_seed(4)
    num_tokens, hidden = 300, 72
    token, bucket_of_row = expert_choice_selection(num_tokens, 8, 50, generator)
    cpp = kernels.extension.bucket(token, bucket_of_row, num_tokens, 8)
    fallback = torch_kernels.bucket(token, bucket_of_row, num_tokens, 8)
    for ours, theirs in zip(cpp, fallback):
        assert torch.equal(ours, theirs)
    source_token, _, _, _, offsets, members = cpp
    accumulation = torch_kernels.accumulation_dtype(dtype)
    tokens = torch.randn(num_tokens, hidden, generator=generator).to(dtype)
    rows = torch.randn(token.numel(), hidden, generator=generator).to(dtype)
    scale = torch.rand(token.numel(), generator=generator).to(accumulation)
    for op, args in [
        ("gather_rows", (tokens, source_token, None)),
        ("gather_rows", (tokens, source_token, scale)),
        ("segment_sum_rows", (rows, offsets, members, None)),
        ("segment_sum_rows", (rows, offsets, members, scale)),
    ]:
        assert torch.equal(getattr(kernels.extension, op)(*args),
                           getattr(torch_kernels, op)(*args)), op
    grad_rows, grad_scale = kernels.extension.combine_backward(tokens, source_token, scale, rows)
    expected_rows, expected_scale = torch_kernels.combine_backward(tokens, source_token, scale, rows)
    assert torch.equal(grad_rows, expected_rows)
    # The dot product's summation order differs (8 partial sums against torch's reduction).
    torch.testing.assert_close(grad_scale, expected_scale, rtol=1e-5, atol=1e-5)


@needs_extension
def test_cpp_kernels_reject_out_of_range_indices():
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.extension.gather_rows(torch.randn(4, 8), torch.tensor([0, 4]))
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.extension.bucket(torch.tensor([0, 1]), torch.tensor([0, 3]), 2, 3)


def test_disable_ext_environment_variable_forces_the_fallback():
    code = ("import torch; from megatron_moma.ops import backend_for; "
            "print(backend_for(torch.zeros(1)))")
    env = dict(os.environ, MEGATRON_MOMA_DISABLE_EXT="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "torch"


def test_backend_choice():
    if not HAS_EXTENSION:
        assert kernels.backend_for(torch.zeros(1)) == "torch"
        return
    assert kernels.backend_for(torch.zeros(1)) == "cpp"
    assert kernels.backend_for(torch.zeros(1, dtype=torch.int32)) == "torch"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [1024, 13])  # 16-byte vector path and the scalar path
def test_cuda_kernels_match_the_cpu(dtype, hidden):
    assert kernels.backend_for(torch.zeros(1, device="cuda", dtype=dtype)) == "cuda"
    generator = torch.Generator().manual_seed(5)
    num_tokens = 2048
    token, bucket_of_row = expert_choice_selection(num_tokens, 8, 384, generator)
    tokens = torch.randn(num_tokens, hidden, generator=generator).to(dtype)
    weight = torch.rand(token.numel(), generator=generator)
    grad_out = torch.randn(num_tokens, hidden, generator=generator).to(dtype)
    results = {}
    for device in ("cpu", "cuda"):
        layout = bucket(token.to(device), bucket_of_row.to(device), num_tokens, 8)
        x = tokens.to(device).requires_grad_(True)
        w = weight.to(device).requires_grad_(True)
        out = unpermute_combine(permute(x, layout) * 2, w, layout)
        out.backward(grad_out.to(device))
        results[device] = [t.cpu().float() for t in (out, x.grad, w.grad)]
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for on_cpu, on_gpu in zip(results["cpu"], results["cuda"]):
        torch.testing.assert_close(on_gpu, on_cpu, **tolerance)


def modality_grouped_selection(num_tokens, experts_per_group, image_share, generator):
    """MoMa-like rows: each expert of a group takes a quarter of its group's tokens (duplicates
    across experts); buckets numbered group by group. image_share 0: group 1 has no token and all
    its buckets are empty. -> token_of_row [R], bucket_of_row [R], number of buckets."""
    modality = (torch.rand(num_tokens, generator=generator) < image_share).long()
    tokens, buckets, first = [], [], 0
    for group, experts in enumerate(experts_per_group):
        members = (modality == group).nonzero().flatten()
        taken = members.numel() // 4 + (1 if members.numel() else 0)
        for expert in range(experts):
            tokens.append(members[torch.randperm(members.numel(), generator=generator)[:taken]])
            buckets.append(torch.full((taken,), first + expert))
        first += experts
    shuffle = torch.randperm(sum(t.numel() for t in tokens), generator=generator)
    return torch.cat(tokens)[shuffle], torch.cat(buckets)[shuffle], first


def cuda_bucket_cases():
    """(token_of_row, bucket_of_row, num_tokens, num_buckets) on the CPU, each named."""
    generator = torch.Generator().manual_seed(6)
    random_rows = lambda rows, tokens, buckets: (  # noqa: E731
        torch.randint(0, tokens, (rows,), generator=generator),
        torch.randint(0, buckets, (rows,), generator=generator), tokens, buckets)
    cases = {
        "moma-4t4i": (*modality_grouped_selection(3000, (4, 4), 0.4, generator)[:2], 3000, 8),
        "moma-no-image-tokens": (*modality_grouped_selection(2500, (4, 4), 0.0, generator)[:2],
                                 2500, 8),
        "expert-choice-duplicates": (*expert_choice_selection(4096, 8, 1024, generator), 4096, 8),
        "heavy-duplicates": random_rows(5000, 300, 37),  # ~17 copies per token, 5 tiles
        "one-bucket": random_rows(3000, 3000, 1),
        "many-buckets": random_rows(2500, 100, 2000),  # mostly empty buckets
        "one-row": random_rows(1, 5, 3),
        "no-rows": (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 10, 4),
        "no-tokens": (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 0, 4),
    }
    return cases


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(cuda_bucket_cases()))
def test_cuda_bucket_equals_the_cpu_counting_sort(case):
    """The CUDA counting sort gives exactly the C++ CPU kernel's (stable) layout, without a host
    synchronization (torch's sync debug mode raises on one)."""
    token, bucket_of_row, num_tokens, num_buckets = cuda_bucket_cases()[case]
    assert kernels.bucket_kernel(token.cuda()) is kernels.extension.bucket
    expected = kernels.extension.bucket(token, bucket_of_row, num_tokens, num_buckets)
    token_gpu, bucket_gpu = token.cuda(), bucket_of_row.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = kernels.extension.bucket(token_gpu, bucket_gpu, num_tokens, num_buckets)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    names = ["source_token", "order", "position", "counts", "token_offsets", "positions_by_token"]
    for name, ours, cpu in zip(names, got, expected):
        assert ours.is_cuda and ours.dtype == torch.long, name
        assert torch.equal(ours.cpu(), cpu), name
