// Launchers of the CUDA dispatch kernels, on raw pointers so that the .cu file needs no torch
// headers (CI compiles it with plain nvcc). Shapes as in dispatch.h; scale is fp32 or null.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace megatron_moma {

enum class RowDtype { kFloat32, kBFloat16 };

cudaError_t launch_gather_rows(RowDtype dtype, const void* src, const int64_t* index,
                               const float* scale, void* out, int64_t rows, int64_t hidden,
                               cudaStream_t stream);

cudaError_t launch_segment_sum_rows(RowDtype dtype, const void* src, const int64_t* offsets,
                                    const int64_t* members, const float* scale, void* out,
                                    int64_t num_out, int64_t hidden, cudaStream_t stream);

cudaError_t launch_combine_backward(RowDtype dtype, const void* grad_out, const int64_t* index,
                                    const float* scale, const void* rows, void* grad_rows,
                                    float* grad_scale, int64_t num_rows, int64_t hidden,
                                    cudaStream_t stream);

}  // namespace megatron_moma
