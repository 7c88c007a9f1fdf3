// CPU implementation of the dispatch ops: parallel over rows (at::parallel_for), with an inner
// loop over the hidden dimension that the compiler vectorizes (contiguous, restrict pointers).
// Accumulation is in at::opmath_type (float for bf16/fp16/fp32, double for fp64), summed in a
// fixed order, so results are deterministic and equal the pure-torch fallback's.
#include "dispatch.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace megatron_moma {
namespace {

// Rows per parallel chunk: enough work per task to amortise scheduling (~32k elements).
int64_t grain_rows(int64_t hidden) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, hidden)); }

void check_index(const at::Tensor& index, int64_t limit, const char* what) {
  check_index_tensor(index, what);
  if (index.numel() == 0) return;
  const auto bounds = at::aminmax(index);
  TORCH_CHECK(std::get<0>(bounds).item<int64_t>() >= 0 && std::get<1>(bounds).item<int64_t>() < limit,
              what, " out of range [0, ", limit, ")");
}

// A fresh output. Outputs of more than a few MiB are fresh mmap()s of the allocator, and their
// first write faults every 4 KiB page in, zero-filled by the kernel: for the row copies here that
// costs about as much as the copy itself. Asking for transparent huge pages on the 2 MiB-aligned
// interior before the first write takes one fault per 2 MiB instead. Only advice: no effect where
// THP is off ("never") or on memory already mapped.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  auto out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + out.nbytes()) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
  return out;
}

at::Tensor rows_2d(const at::Tensor& t, const char* what) {
  check_rows_tensor(t, what);
  return t.contiguous();
}

// The optional per-row scale as a contiguous tensor of the accumulation type, or undefined.
at::Tensor scale_as(const std::optional<at::Tensor>& scale, at::ScalarType acc, int64_t rows) {
  if (!scale.has_value()) return at::Tensor();
  TORCH_CHECK(scale->dim() == 1 && scale->numel() == rows, "scale must be [rows]");
  return scale->to(acc).contiguous();
}

template <typename scalar_t>
void gather_rows_kernel(const scalar_t* src, const int64_t* index,
                        const at::opmath_type<scalar_t>* scale, scalar_t* out, int64_t rows,
                        int64_t hidden) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, rows, grain_rows(hidden), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const scalar_t* __restrict__ in = src + index[p] * hidden;
      scalar_t* __restrict__ o = out + p * hidden;
      if (scale == nullptr) {
        std::memcpy(o, in, hidden * sizeof(scalar_t));
        continue;
      }
      const acc_t s = scale[p];
      for (int64_t k = 0; k < hidden; ++k) o[k] = static_cast<scalar_t>(static_cast<acc_t>(in[k]) * s);
    }
  });
}

// One pass per member row: the first member is written (scaled) into the accumulator, the
// others are added to it; a segment without members is zero-filled.
template <typename scalar_t>
void segment_sum_rows_kernel(const scalar_t* src, const int64_t* offsets, const int64_t* members,
                             const at::opmath_type<scalar_t>* scale, scalar_t* out,
                             int64_t num_out, int64_t hidden) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kAccumulateInPlace = std::is_same_v<scalar_t, acc_t>;
  at::parallel_for(0, num_out, grain_rows(hidden), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(kAccumulateInPlace ? 0 : hidden);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t first = offsets[t], last = offsets[t + 1];
      if (first == last) {
        std::memset(out + t * hidden, 0, hidden * sizeof(scalar_t));
        continue;
      }
      acc_t* __restrict__ acc =
          kAccumulateInPlace ? reinterpret_cast<acc_t*>(out + t * hidden) : buffer.data();
      for (int64_t j = first; j < last; ++j) {
        const int64_t p = members[j];
        const scalar_t* __restrict__ in = src + p * hidden;
        const acc_t s = scale == nullptr ? acc_t(1) : scale[p];
        if (j == first && scale == nullptr) {
          for (int64_t k = 0; k < hidden; ++k) acc[k] = static_cast<acc_t>(in[k]);
        } else if (j == first) {
          for (int64_t k = 0; k < hidden; ++k) acc[k] = static_cast<acc_t>(in[k]) * s;
        } else if (scale == nullptr) {
          for (int64_t k = 0; k < hidden; ++k) acc[k] += static_cast<acc_t>(in[k]);
        } else {
          for (int64_t k = 0; k < hidden; ++k) acc[k] += static_cast<acc_t>(in[k]) * s;
        }
      }
      if constexpr (!kAccumulateInPlace) {
        scalar_t* __restrict__ o = out + t * hidden;
        for (int64_t k = 0; k < hidden; ++k) o[k] = static_cast<scalar_t>(acc[k]);
      }
    }
  });
}

template <typename scalar_t>
void combine_backward_kernel(const scalar_t* grad_out, const int64_t* index,
                             const at::opmath_type<scalar_t>* scale, const scalar_t* rows_in,
                             scalar_t* grad_rows, at::opmath_type<scalar_t>* grad_scale,
                             int64_t rows, int64_t hidden) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kLanes = 8;  // independent partial sums, so the dot product vectorizes
  at::parallel_for(0, rows, grain_rows(hidden), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const scalar_t* __restrict__ g = grad_out + index[p] * hidden;
      const scalar_t* __restrict__ x = rows_in + p * hidden;
      scalar_t* __restrict__ o = grad_rows + p * hidden;
      const acc_t s = scale[p];
      acc_t partial[kLanes] = {};
      int64_t k = 0;
      for (; k + kLanes <= hidden; k += kLanes) {
        for (int64_t l = 0; l < kLanes; ++l) {
          const acc_t gk = static_cast<acc_t>(g[k + l]);
          o[k + l] = static_cast<scalar_t>(gk * s);
          partial[l] += static_cast<acc_t>(x[k + l]) * gk;
        }
      }
      for (; k < hidden; ++k) {
        const acc_t gk = static_cast<acc_t>(g[k]);
        o[k] = static_cast<scalar_t>(gk * s);
        partial[0] += static_cast<acc_t>(x[k]) * gk;
      }
      acc_t dot = 0;
      for (int64_t l = 0; l < kLanes; ++l) dot += partial[l];
      grad_scale[p] = dot;
    }
  });
}

}  // namespace

BucketOutputs bucket_cpu(const at::Tensor& token_of_row_in, const at::Tensor& bucket_of_row_in,
                         int64_t num_tokens, int64_t num_buckets) {
  check_bucket_args(token_of_row_in, bucket_of_row_in, num_tokens, num_buckets);
  check_index(token_of_row_in, num_tokens, "token_of_row");
  check_index(bucket_of_row_in, num_buckets, "bucket_of_row");
  const auto token_of_row = token_of_row_in.contiguous();
  const auto bucket_of_row = bucket_of_row_in.contiguous();
  const int64_t rows = token_of_row.numel();
  const BucketLayout layout(rows, num_tokens, num_buckets, token_of_row.options());

  const int64_t* token = token_of_row.data_ptr<int64_t>();
  const int64_t* bucket = bucket_of_row.data_ptr<int64_t>();
  int64_t* count = layout.counts.data_ptr<int64_t>();
  int64_t* offset = layout.token_offsets.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows; ++i) {
    ++count[bucket[i]];
    ++offset[token[i] + 1];
  }
  std::vector<int64_t> next_in_bucket(num_buckets, 0);
  for (int64_t b = 1; b < num_buckets; ++b) next_in_bucket[b] = next_in_bucket[b - 1] + count[b - 1];
  for (int64_t t = 0; t < num_tokens; ++t) offset[t + 1] += offset[t];

  int64_t* src_token = layout.source_token.data_ptr<int64_t>();
  int64_t* ord = layout.order.data_ptr<int64_t>();
  int64_t* pos = layout.position.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t p = next_in_bucket[bucket[i]]++;
    ord[p] = i;
    pos[i] = p;
    src_token[p] = token[i];
  }
  std::vector<int64_t> next_of_token(offset, offset + num_tokens);
  int64_t* by_token = layout.positions_by_token.data_ptr<int64_t>();
  for (int64_t p = 0; p < rows; ++p) by_token[next_of_token[src_token[p]]++] = p;
  return layout.outputs();
}

at::Tensor gather_rows_cpu(const at::Tensor& src_in, const at::Tensor& index_in,
                           const std::optional<at::Tensor>& scale_in) {
  const auto src = rows_2d(src_in, "src");
  check_index(index_in, src.size(0), "index");
  const auto index = index_in.contiguous();
  const int64_t rows = index.numel(), hidden = src.size(1);
  auto out = empty_output({rows, hidden}, src.options());
  const auto scale = scale_as(scale_in, at::toOpMathType(src.scalar_type()), rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "gather_rows_cpu", [&] {
    gather_rows_kernel<scalar_t>(
        src.data_ptr<scalar_t>(), index.data_ptr<int64_t>(),
        scale.defined() ? scale.data_ptr<at::opmath_type<scalar_t>>() : nullptr,
        out.data_ptr<scalar_t>(), rows, hidden);
  });
  return out;
}

at::Tensor segment_sum_rows_cpu(const at::Tensor& src_in, const at::Tensor& offsets_in,
                                const at::Tensor& members_in,
                                const std::optional<at::Tensor>& scale_in) {
  check_segment_sum_args(src_in, offsets_in, members_in);
  const auto src = src_in.contiguous();
  check_index(members_in, src.size(0), "members");
  const auto offsets = offsets_in.contiguous();
  const auto members = members_in.contiguous();
  const int64_t num_out = offsets.numel() - 1, hidden = src.size(1);
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[num_out] == members.numel(), "offsets must span members");
  for (int64_t t = 0; t < num_out; ++t) TORCH_CHECK(off[t] <= off[t + 1], "offsets must not decrease");
  auto out = empty_output({num_out, hidden}, src.options());
  const auto scale = scale_as(scale_in, at::toOpMathType(src.scalar_type()), src.size(0));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "segment_sum_rows_cpu", [&] {
    segment_sum_rows_kernel<scalar_t>(
        src.data_ptr<scalar_t>(), off, members.data_ptr<int64_t>(),
        scale.defined() ? scale.data_ptr<at::opmath_type<scalar_t>>() : nullptr,
        out.data_ptr<scalar_t>(), num_out, hidden);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> combine_backward_cpu(const at::Tensor& grad_out_in,
                                                        const at::Tensor& index_in,
                                                        const at::Tensor& scale_in,
                                                        const at::Tensor& rows_in) {
  check_combine_backward_args(grad_out_in, index_in, rows_in);
  check_index(index_in, grad_out_in.size(0), "index");
  const auto grad_out = grad_out_in.contiguous();
  const auto rows = rows_in.contiguous();
  const auto index = index_in.contiguous();
  const int64_t num_rows = rows.size(0), hidden = rows.size(1);
  const auto acc = at::toOpMathType(rows.scalar_type());
  const auto scale = scale_as(scale_in, acc, num_rows);
  auto grad_rows = empty_output(rows.sizes(), rows.options());
  auto grad_scale = at::empty({num_rows}, rows.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "combine_backward_cpu", [&] {
    combine_backward_kernel<scalar_t>(
        grad_out.data_ptr<scalar_t>(), index.data_ptr<int64_t>(),
        scale.data_ptr<at::opmath_type<scalar_t>>(), rows.data_ptr<scalar_t>(),
        grad_rows.data_ptr<scalar_t>(), grad_scale.data_ptr<at::opmath_type<scalar_t>>(),
        num_rows, hidden);
  });
  return {grad_rows, grad_scale};
}

}  // namespace megatron_moma
