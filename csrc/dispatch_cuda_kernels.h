// Launchers of the CUDA dispatch kernels, on raw pointers so that the .cu file needs no torch
// headers (CI compiles it with plain nvcc). Shapes as in dispatch.h; scale is fp32 or null.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace megatron_moma {

enum class RowDtype { kFloat32, kBFloat16 };

// Rows per tile of the bucket op: its histogram and scatter count rows per (bucket, tile).
constexpr int64_t kBucketTileRows = 1024;

inline int64_t bucket_tiles(int64_t rows) { return (rows + kBucketTileRows - 1) / kBucketTileRows; }

// Stable counting sort of rows by bucket, and the same layout by token (outputs as bucket_cpu
// in dispatch.h). Workspace, zero-filled by the caller: tile_starts [num_buckets *
// bucket_tiles(rows)], token_fill [num_tokens]; counts and token_offsets zero-filled too.
// Out-of-range token or bucket ids abort the kernel (no host synchronization to report them).
cudaError_t launch_bucket(const int64_t* token_of_row, const int64_t* bucket_of_row, int64_t rows,
                          int64_t num_tokens, int64_t num_buckets, int64_t* tile_starts,
                          int64_t* token_fill, int64_t* source_token, int64_t* order,
                          int64_t* position, int64_t* counts, int64_t* token_offsets,
                          int64_t* positions_by_token, cudaStream_t stream);

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
