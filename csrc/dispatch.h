// Token-modality dispatch ops: declarations shared by the bindings and the implementations.
//
// Shapes: N tokens, R rows (a token chosen by k experts appears k times), h hidden, B buckets.
// A "bucket" is one (modality group, expert) pair, or under expert parallelism one (owner rank,
// local expert) slot; the caller numbers them 0..B-1.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <tuple>

namespace megatron_moma {

// ---- Argument checks shared by the CPU and CUDA implementations. Each implementation adds its
// device checks and, on CPU only (it needs the values on the host), the index range checks.

inline void check_index_tensor(const at::Tensor& index, const char* what) {
  TORCH_CHECK(index.scalar_type() == at::kLong && index.dim() == 1, what, " must be int64 and 1-D");
}

inline void check_rows_tensor(const at::Tensor& rows, const char* what) {
  TORCH_CHECK(rows.dim() == 2, what, " must be [rows, hidden]");
}

inline void check_bucket_args(const at::Tensor& token_of_row, const at::Tensor& bucket_of_row,
                              int64_t num_tokens, int64_t num_buckets) {
  check_index_tensor(token_of_row, "token_of_row");
  check_index_tensor(bucket_of_row, "bucket_of_row");
  TORCH_CHECK(token_of_row.numel() == bucket_of_row.numel(),
              "token_of_row and bucket_of_row must have the same length");
  TORCH_CHECK(num_tokens >= 0 && num_buckets >= 0, "num_tokens and num_buckets must be >= 0");
}

inline void check_segment_sum_args(const at::Tensor& src, const at::Tensor& offsets,
                                   const at::Tensor& members) {
  check_rows_tensor(src, "src");
  check_index_tensor(offsets, "offsets");
  check_index_tensor(members, "members");
  TORCH_CHECK(offsets.numel() >= 1, "offsets must be [num_out + 1]");
  TORCH_CHECK(members.numel() == src.size(0), "members must have one entry per source row");
}

inline void check_combine_backward_args(const at::Tensor& grad_out, const at::Tensor& index,
                                        const at::Tensor& rows) {
  check_rows_tensor(grad_out, "grad_out");
  check_rows_tensor(rows, "rows");
  TORCH_CHECK(rows.scalar_type() == grad_out.scalar_type() && rows.size(1) == grad_out.size(1),
              "rows and grad_out must share dtype and hidden size");
  check_index_tensor(index, "index");
  TORCH_CHECK(index.numel() == rows.size(0), "index must have one entry per row");
}

// ---- The bucket op's outputs (see bucket_cpu), allocated on the indices' device; counts and
// token_offsets zero-filled, the rest left for the kernels to write.
using BucketOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

struct BucketLayout {
  at::Tensor source_token, order, position, counts, token_offsets, positions_by_token;

  BucketLayout(int64_t rows, int64_t num_tokens, int64_t num_buckets,
               const at::TensorOptions& options)
      : source_token(at::empty({rows}, options)),
        order(at::empty({rows}, options)),
        position(at::empty({rows}, options)),
        counts(at::zeros({num_buckets}, options)),
        token_offsets(at::zeros({num_tokens + 1}, options)),
        positions_by_token(at::empty({rows}, options)) {}

  BucketOutputs outputs() const {
    return {source_token, order, position, counts, token_offsets, positions_by_token};
  }
};

// ---- The ops.

// Stable counting sort of rows by bucket, and the same layout indexed by token.
// token_of_row [R], bucket_of_row [R] int64 ->
//   source_token [R]: token held at each permuted position,
//   order [R]: row (selection) index at each permuted position,
//   position [R]: permuted position of each row (inverse of order),
//   counts [B]: rows per bucket,
//   token_offsets [N+1], positions_by_token [R]: for token t, the positions holding it are
//     positions_by_token[token_offsets[t] : token_offsets[t+1]], increasing.
BucketOutputs bucket_cpu(
    const at::Tensor& token_of_row, const at::Tensor& bucket_of_row, int64_t num_tokens,
    int64_t num_buckets);

// out[p] = scale[p] * src[index[p]] (scale omitted: a plain gather). src [N, h], index [R] -> [R, h].
at::Tensor gather_rows_cpu(const at::Tensor& src, const at::Tensor& index,
                           const std::optional<at::Tensor>& scale);

// out[t] = sum over j in offsets[t]..offsets[t+1] of scale[members[j]] * src[members[j]],
// summed in j order in the accumulation type. src [R, h], offsets [N+1], members [R] -> [N, h].
at::Tensor segment_sum_rows_cpu(const at::Tensor& src, const at::Tensor& offsets,
                                const at::Tensor& members, const std::optional<at::Tensor>& scale);

// Backward of the weighted combine: grad_rows[p] = scale[p] * grad_out[index[p]] and
// grad_scale[p] = <rows[p], grad_out[index[p]]>. grad_out [N, h], index [R], scale [R], rows [R, h].
std::tuple<at::Tensor, at::Tensor> combine_backward_cpu(const at::Tensor& grad_out,
                                                        const at::Tensor& index,
                                                        const at::Tensor& scale,
                                                        const at::Tensor& rows);

#ifdef WITH_CUDA
BucketOutputs bucket_cuda(
    const at::Tensor& token_of_row, const at::Tensor& bucket_of_row, int64_t num_tokens,
    int64_t num_buckets);
at::Tensor gather_rows_cuda(const at::Tensor& src, const at::Tensor& index,
                            const std::optional<at::Tensor>& scale);
at::Tensor segment_sum_rows_cuda(const at::Tensor& src, const at::Tensor& offsets,
                                 const at::Tensor& members, const std::optional<at::Tensor>& scale);
std::tuple<at::Tensor, at::Tensor> combine_backward_cuda(const at::Tensor& grad_out,
                                                         const at::Tensor& index,
                                                         const at::Tensor& scale,
                                                         const at::Tensor& rows);
#endif

}  // namespace megatron_moma
