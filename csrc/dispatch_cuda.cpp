// Torch-facing side of the CUDA dispatch ops: checks, allocation, dtype choice and the current
// stream; the kernels themselves are in dispatch_cuda_kernels.cu. fp32 and bf16 rows; scales and
// the weight gradient are fp32.
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

at::Tensor rows_2d(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.is_cuda() && t.dim() == 2, what, " must be a CUDA [rows, hidden] tensor");
  return t.contiguous();
}

at::Tensor index_1d(const at::Tensor& t, const at::Tensor& like, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.device() == like.device(), what,
              " must be int64 [rows] on the rows' device");
  return t.contiguous();
}

at::Tensor scale_fp32(const std::optional<at::Tensor>& scale, int64_t rows) {
  if (!scale.has_value()) return at::Tensor();
  TORCH_CHECK(scale->dim() == 1 && scale->numel() == rows, "scale must be [rows]");
  return scale->to(at::kFloat).contiguous();
}

const float* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<float>() : nullptr;
}

void check(cudaError_t status) { TORCH_CHECK(status == cudaSuccess, cudaGetErrorString(status)); }

}  // namespace

at::Tensor gather_rows_cuda(const at::Tensor& src_in, const at::Tensor& index_in,
                            const std::optional<at::Tensor>& scale_in) {
  const auto src = rows_2d(src_in, "src");
  const c10::cuda::CUDAGuard guard(src.device());
  const auto index = index_1d(index_in, src, "index");
  const int64_t rows = index.numel(), hidden = src.size(1);
  auto out = at::empty({rows, hidden}, src.options());
  const auto scale = scale_fp32(scale_in, rows);
  check(launch_gather_rows(row_dtype(src), src.data_ptr(), index.data_ptr<int64_t>(),
                           data_or_null(scale), out.data_ptr(), rows, hidden,
                           c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor segment_sum_rows_cuda(const at::Tensor& src_in, const at::Tensor& offsets_in,
                                 const at::Tensor& members_in,
                                 const std::optional<at::Tensor>& scale_in) {
  const auto src = rows_2d(src_in, "src");
  const c10::cuda::CUDAGuard guard(src.device());
  const auto offsets = index_1d(offsets_in, src, "offsets");
  const auto members = index_1d(members_in, src, "members");
  TORCH_CHECK(offsets.numel() >= 1 && members.numel() == src.size(0),
              "offsets must be [num_out + 1] and members [rows]");
  const int64_t num_out = offsets.numel() - 1, hidden = src.size(1);
  auto out = at::empty({num_out, hidden}, src.options());
  const auto scale = scale_fp32(scale_in, src.size(0));
  check(launch_segment_sum_rows(row_dtype(src), src.data_ptr(), offsets.data_ptr<int64_t>(),
                                members.data_ptr<int64_t>(), data_or_null(scale), out.data_ptr(),
                                num_out, hidden, c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> combine_backward_cuda(const at::Tensor& grad_out_in,
                                                         const at::Tensor& index_in,
                                                         const at::Tensor& scale_in,
                                                         const at::Tensor& rows_in) {
  const auto grad_out = rows_2d(grad_out_in, "grad_out");
  const auto rows = rows_2d(rows_in, "rows");
  TORCH_CHECK(rows.scalar_type() == grad_out.scalar_type() && rows.size(1) == grad_out.size(1),
              "rows and grad_out must share dtype and hidden size");
  const c10::cuda::CUDAGuard guard(rows.device());
  const auto index = index_1d(index_in, rows, "index");
  TORCH_CHECK(index.numel() == rows.size(0), "index must have one entry per row");
  const int64_t num_rows = rows.size(0), hidden = rows.size(1);
  const auto scale = scale_fp32(scale_in, num_rows);
  auto grad_rows = at::empty_like(rows);
  auto grad_scale = at::empty({num_rows}, rows.options().dtype(at::kFloat));
  check(launch_combine_backward(row_dtype(rows), grad_out.data_ptr(), index.data_ptr<int64_t>(),
                                scale.data_ptr<float>(), rows.data_ptr(), grad_rows.data_ptr(),
                                grad_scale.data_ptr<float>(), num_rows, hidden,
                                c10::cuda::getCurrentCUDAStream()));
  return {grad_rows, grad_scale};
}

}  // namespace megatron_moma
