// Torch-facing side of the CUDA dispatch ops: device checks (the shape checks are shared with the
// CPU side in dispatch.h), allocation, dtype choice and the current stream; the kernels
// themselves are in dispatch_cuda_kernels.cu. fp32 and bf16 rows; scales and the weight gradient
// are fp32. Index ranges are not checked on the host (that would synchronize).
#include "dispatch.h"
#include "dispatch_cuda_kernels.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace megatron_moma {
namespace {

RowDtype row_dtype(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat) return RowDtype::kFloat32;
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, "CUDA dispatch kernels take fp32 or bf16 rows, got ",
              t.scalar_type());
  return RowDtype::kBFloat16;
}

// Contiguous copy (or the tensor itself) after checking it is on `like`'s CUDA device.
at::Tensor on_device_of(const at::Tensor& t, const at::Tensor& like, const char* what) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), what, " must be on the CUDA device ",
              like.device(), ", got ", t.device());
  return t.contiguous();
}

// The optional per-row scale as a contiguous fp32 tensor on `like`'s device, or undefined.
at::Tensor scale_fp32(const std::optional<at::Tensor>& scale, int64_t rows, const at::Tensor& like) {
  if (!scale.has_value()) return at::Tensor();
  TORCH_CHECK(scale->dim() == 1 && scale->numel() == rows, "scale must be [rows]");
  return on_device_of(scale->to(at::kFloat), like, "scale");
}

const float* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<float>() : nullptr;
}

void check(cudaError_t status) { TORCH_CHECK(status == cudaSuccess, cudaGetErrorString(status)); }

}  // namespace

BucketOutputs bucket_cuda(const at::Tensor& token_of_row_in, const at::Tensor& bucket_of_row_in,
                          int64_t num_tokens, int64_t num_buckets) {
  check_bucket_args(token_of_row_in, bucket_of_row_in, num_tokens, num_buckets);
  const auto token_of_row = on_device_of(token_of_row_in, token_of_row_in, "token_of_row");
  const auto bucket_of_row = on_device_of(bucket_of_row_in, token_of_row, "bucket_of_row");
  const c10::cuda::CUDAGuard guard(token_of_row.device());
  const int64_t rows = token_of_row.numel();
  const auto options = token_of_row.options();
  const BucketLayout layout(rows, num_tokens, num_buckets, options);
  auto tile_starts = at::zeros({num_buckets * bucket_tiles(rows)}, options);
  auto token_fill = at::zeros({num_tokens}, options);
  check(launch_bucket(token_of_row.data_ptr<int64_t>(), bucket_of_row.data_ptr<int64_t>(), rows,
                      num_tokens, num_buckets, tile_starts.data_ptr<int64_t>(),
                      token_fill.data_ptr<int64_t>(), layout.source_token.data_ptr<int64_t>(),
                      layout.order.data_ptr<int64_t>(), layout.position.data_ptr<int64_t>(),
                      layout.counts.data_ptr<int64_t>(), layout.token_offsets.data_ptr<int64_t>(),
                      layout.positions_by_token.data_ptr<int64_t>(),
                      c10::cuda::getCurrentCUDAStream()));
  return layout.outputs();
}

at::Tensor gather_rows_cuda(const at::Tensor& src_in, const at::Tensor& index_in,
                            const std::optional<at::Tensor>& scale_in) {
  check_rows_tensor(src_in, "src");
  check_index_tensor(index_in, "index");
  const auto src = on_device_of(src_in, src_in, "src");
  const c10::cuda::CUDAGuard guard(src.device());
  const auto index = on_device_of(index_in, src, "index");
  const int64_t rows = index.numel(), hidden = src.size(1);
  auto out = at::empty({rows, hidden}, src.options());
  const auto scale = scale_fp32(scale_in, rows, src);
  check(launch_gather_rows(row_dtype(src), src.data_ptr(), index.data_ptr<int64_t>(),
                           data_or_null(scale), out.data_ptr(), rows, hidden,
                           c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor segment_sum_rows_cuda(const at::Tensor& src_in, const at::Tensor& offsets_in,
                                 const at::Tensor& members_in,
                                 const std::optional<at::Tensor>& scale_in) {
  check_segment_sum_args(src_in, offsets_in, members_in);
  const auto src = on_device_of(src_in, src_in, "src");
  const c10::cuda::CUDAGuard guard(src.device());
  const auto offsets = on_device_of(offsets_in, src, "offsets");
  const auto members = on_device_of(members_in, src, "members");
  const int64_t num_out = offsets.numel() - 1, hidden = src.size(1);
  auto out = at::empty({num_out, hidden}, src.options());
  const auto scale = scale_fp32(scale_in, src.size(0), src);
  check(launch_segment_sum_rows(row_dtype(src), src.data_ptr(), offsets.data_ptr<int64_t>(),
                                members.data_ptr<int64_t>(), data_or_null(scale), out.data_ptr(),
                                num_out, hidden, c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> combine_backward_cuda(const at::Tensor& grad_out_in,
                                                         const at::Tensor& index_in,
                                                         const at::Tensor& scale_in,
                                                         const at::Tensor& rows_in) {
  check_combine_backward_args(grad_out_in, index_in, rows_in);
  const auto rows = on_device_of(rows_in, rows_in, "rows");
  const c10::cuda::CUDAGuard guard(rows.device());
  const auto grad_out = on_device_of(grad_out_in, rows, "grad_out");
  const auto index = on_device_of(index_in, rows, "index");
  const int64_t num_rows = rows.size(0), hidden = rows.size(1);
  const auto scale = scale_fp32(scale_in, num_rows, rows);
  auto grad_rows = at::empty_like(rows);
  auto grad_scale = at::empty({num_rows}, rows.options().dtype(at::kFloat));
  check(launch_combine_backward(row_dtype(rows), grad_out.data_ptr(), index.data_ptr<int64_t>(),
                                scale.data_ptr<float>(), rows.data_ptr(), grad_rows.data_ptr(),
                                grad_scale.data_ptr<float>(), num_rows, hidden,
                                c10::cuda::getCurrentCUDAStream()));
  return {grad_rows, grad_scale};
}

}  // namespace megatron_moma
