// pybind11 module megatron_moma._csrc: the dispatch ops, routed by device. The Python package
// (megatron_moma.ops) wraps them in autograd functions and chooses them or the pure-torch
// fallback automatically.
#include "dispatch.h"

namespace megatron_moma {
namespace {

bool on_cuda(const at::Tensor& t) { return t.device().is_cuda(); }

[[noreturn]] void no_cuda(const char* op) {
  TORCH_CHECK(false, op, ": this build of megatron_moma._csrc has no CUDA kernels");
}

BucketOutputs bucket(const at::Tensor& token_of_row, const at::Tensor& bucket_of_row,
                     int64_t num_tokens, int64_t num_buckets) {
  if (!on_cuda(token_of_row)) return bucket_cpu(token_of_row, bucket_of_row, num_tokens, num_buckets);
#ifdef WITH_CUDA
  return bucket_cuda(token_of_row, bucket_of_row, num_tokens, num_buckets);
#else
  no_cuda("bucket");
#endif
}

at::Tensor gather_rows(const at::Tensor& src, const at::Tensor& index,
                       const std::optional<at::Tensor>& scale) {
  if (!on_cuda(src)) return gather_rows_cpu(src, index, scale);
#ifdef WITH_CUDA
  return gather_rows_cuda(src, index, scale);
#else
  no_cuda("gather_rows");
#endif
}

at::Tensor segment_sum_rows(const at::Tensor& src, const at::Tensor& offsets,
                            const at::Tensor& members, const std::optional<at::Tensor>& scale) {
  if (!on_cuda(src)) return segment_sum_rows_cpu(src, offsets, members, scale);
#ifdef WITH_CUDA
  return segment_sum_rows_cuda(src, offsets, members, scale);
#else
  no_cuda("segment_sum_rows");
#endif
}

std::tuple<at::Tensor, at::Tensor> combine_backward(const at::Tensor& grad_out,
                                                    const at::Tensor& index,
                                                    const at::Tensor& scale,
                                                    const at::Tensor& rows) {
  if (!on_cuda(rows)) return combine_backward_cpu(grad_out, index, scale, rows);
#ifdef WITH_CUDA
  return combine_backward_cuda(grad_out, index, scale, rows);
#else
  no_cuda("combine_backward");
#endif
}

}  // namespace
}  // namespace megatron_moma

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron-moma token-modality dispatch kernels (see csrc/dispatch.h for shapes)";
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("bucket", &megatron_moma::bucket, "Stable counting sort of rows by bucket",
        py::arg("token_of_row"), py::arg("bucket_of_row"), py::arg("num_tokens"),
        py::arg("num_buckets"));
  m.def("gather_rows", &megatron_moma::gather_rows, "out[p] = scale[p] * src[index[p]]",
        py::arg("src"), py::arg("index"), py::arg("scale") = py::none());
  m.def("segment_sum_rows", &megatron_moma::segment_sum_rows,
        "out[t] = sum of scale[m] * src[m] over the members m of segment t", py::arg("src"),
        py::arg("offsets"), py::arg("members"), py::arg("scale") = py::none());
  m.def("combine_backward", &megatron_moma::combine_backward,
        "(scale[p] * grad_out[index[p]], <rows[p], grad_out[index[p]]>)", py::arg("grad_out"),
        py::arg("index"), py::arg("scale"), py::arg("rows"));
}
