// CUDA dispatch kernels: one warp per row, 16-byte vector loads and stores (4 fp32 or 8 bf16 per
// lane per step, consecutive lanes on consecutive 16-byte chunks, so each warp access is a
// coalesced 512-byte transaction), fp32 accumulation. Rows whose size or address is not a
// multiple of 16 bytes take the same kernels with one element per access.
#include "dispatch_cuda_kernels.h"

#include <cuda_bf16.h>

#include <algorithm>

namespace megatron_moma {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarp * kWarpsPerBlock;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// VEC elements of T moved as one aligned access (16 bytes when VEC * sizeof(T) == 16).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T val[VEC];
};

__device__ __forceinline__ int64_t global_warp() {
  return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
}
__device__ __forceinline__ int64_t warp_count() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
}

template <typename T, int VEC>
__global__ void gather_rows_kernel(const T* __restrict__ src, const int64_t* __restrict__ index,
                                   const float* __restrict__ scale, T* __restrict__ out,
                                   int64_t rows, int64_t hidden) {
  using P = Pack<T, VEC>;
  const int lane = threadIdx.x % kWarp;
  const int64_t packs = hidden / VEC;
  for (int64_t p = global_warp(); p < rows; p += warp_count()) {
    const P* in = reinterpret_cast<const P*>(src + index[p] * hidden);
    P* o = reinterpret_cast<P*>(out + p * hidden);
    const float s = scale == nullptr ? 1.f : scale[p];
    for (int64_t v = lane; v < packs; v += kWarp) {
      P x = in[v];
      if (scale != nullptr) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) x.val[e] = from_float<T>(to_float(x.val[e]) * s);
      }
      o[v] = x;
    }
  }
}

template <typename T, int VEC>
__global__ void segment_sum_rows_kernel(const T* __restrict__ src,
                                        const int64_t* __restrict__ offsets,
                                        const int64_t* __restrict__ members,
                                        const float* __restrict__ scale, T* __restrict__ out,
                                        int64_t num_out, int64_t hidden) {
  using P = Pack<T, VEC>;
  const int lane = threadIdx.x % kWarp;
  const int64_t packs = hidden / VEC;
  for (int64_t t = global_warp(); t < num_out; t += warp_count()) {
    const int64_t first = offsets[t], last = offsets[t + 1];
    P* o = reinterpret_cast<P*>(out + t * hidden);
    for (int64_t v = lane; v < packs; v += kWarp) {
      float acc[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] = 0.f;
      for (int64_t j = first; j < last; ++j) {
        const int64_t m = members[j];
        const float s = scale == nullptr ? 1.f : scale[m];
        const P x = reinterpret_cast<const P*>(src + m * hidden)[v];
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] += to_float(x.val[e]) * s;
      }
      P y;
#pragma unroll
      for (int e = 0; e < VEC; ++e) y.val[e] = from_float<T>(acc[e]);
      o[v] = y;
    }
  }
}

template <typename T, int VEC>
__global__ void combine_backward_kernel(const T* __restrict__ grad_out,
                                        const int64_t* __restrict__ index,
                                        const float* __restrict__ scale,
                                        const T* __restrict__ rows, T* __restrict__ grad_rows,
                                        float* __restrict__ grad_scale, int64_t num_rows,
                                        int64_t hidden) {
  using P = Pack<T, VEC>;
  const int lane = threadIdx.x % kWarp;
  const int64_t packs = hidden / VEC;
  for (int64_t p = global_warp(); p < num_rows; p += warp_count()) {
    const P* g = reinterpret_cast<const P*>(grad_out + index[p] * hidden);
    const P* x = reinterpret_cast<const P*>(rows + p * hidden);
    P* o = reinterpret_cast<P*>(grad_rows + p * hidden);
    const float s = scale[p];
    float dot = 0.f;
    for (int64_t v = lane; v < packs; v += kWarp) {
      const P gv = g[v];
      const P xv = x[v];
      P ov;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float ge = to_float(gv.val[e]);
        ov.val[e] = from_float<T>(ge * s);
        dot += to_float(xv.val[e]) * ge;
      }
      o[v] = ov;
    }
#pragma unroll
    for (int shift = kWarp / 2; shift > 0; shift /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, shift);
    if (lane == 0) grad_scale[p] = dot;
  }
}

// Enough blocks to fill the GPU several times over; the kernels stride over the rest.
unsigned int blocks_for(int64_t rows) {
  const int64_t wanted = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(wanted, 65535)));
}

// True when every row of every pointer starts on a 16-byte boundary.
bool rows_aligned(int64_t hidden, size_t element_size, const void* a, const void* b,
                  const void* c = nullptr) {
  const auto aligned = [](const void* ptr) {
    return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
  };
  return (hidden * element_size) % 16 == 0 && aligned(a) && aligned(b) && aligned(c);
}

template <typename T, typename Launch>
cudaError_t with_vector_width(int64_t rows, int64_t hidden, bool aligned, Launch launch) {
  if (rows == 0 || hidden == 0) return cudaSuccess;
  constexpr int kVec = 16 / sizeof(T);
  if (aligned) {
    launch(std::integral_constant<int, kVec>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t gather_rows_typed(const void* src, const int64_t* index, const float* scale,
                              void* out, int64_t rows, int64_t hidden, cudaStream_t stream) {
  const bool aligned = rows_aligned(hidden, sizeof(T), src, out);
  return with_vector_width<T>(rows, hidden, aligned, [&](auto vec) {
    gather_rows_kernel<T, decltype(vec)::value><<<blocks_for(rows), kThreads, 0, stream>>>(
        static_cast<const T*>(src), index, scale, static_cast<T*>(out), rows, hidden);
  });
}

template <typename T>
cudaError_t segment_sum_rows_typed(const void* src, const int64_t* offsets,
                                   const int64_t* members, const float* scale, void* out,
                                   int64_t num_out, int64_t hidden, cudaStream_t stream) {
  const bool aligned = rows_aligned(hidden, sizeof(T), src, out);
  return with_vector_width<T>(num_out, hidden, aligned, [&](auto vec) {
    segment_sum_rows_kernel<T, decltype(vec)::value><<<blocks_for(num_out), kThreads, 0, stream>>>(
        static_cast<const T*>(src), offsets, members, scale, static_cast<T*>(out), num_out,
        hidden);
  });
}

template <typename T>
cudaError_t combine_backward_typed(const void* grad_out, const int64_t* index, const float* scale,
                                   const void* rows, void* grad_rows, float* grad_scale,
                                   int64_t num_rows, int64_t hidden, cudaStream_t stream) {
  const bool aligned = rows_aligned(hidden, sizeof(T), grad_out, rows, grad_rows);
  return with_vector_width<T>(num_rows, hidden, aligned, [&](auto vec) {
    combine_backward_kernel<T, decltype(vec)::value><<<blocks_for(num_rows), kThreads, 0, stream>>>(
        static_cast<const T*>(grad_out), index, scale, static_cast<const T*>(rows),
        static_cast<T*>(grad_rows), grad_scale, num_rows, hidden);
  });
}

}  // namespace

cudaError_t launch_gather_rows(RowDtype dtype, const void* src, const int64_t* index,
                               const float* scale, void* out, int64_t rows, int64_t hidden,
                               cudaStream_t stream) {
  return dtype == RowDtype::kFloat32
             ? gather_rows_typed<float>(src, index, scale, out, rows, hidden, stream)
             : gather_rows_typed<__nv_bfloat16>(src, index, scale, out, rows, hidden, stream);
}

cudaError_t launch_segment_sum_rows(RowDtype dtype, const void* src, const int64_t* offsets,
                                    const int64_t* members, const float* scale, void* out,
                                    int64_t num_out, int64_t hidden, cudaStream_t stream) {
  return dtype == RowDtype::kFloat32
             ? segment_sum_rows_typed<float>(src, offsets, members, scale, out, num_out, hidden,
                                             stream)
             : segment_sum_rows_typed<__nv_bfloat16>(src, offsets, members, scale, out, num_out,
                                                     hidden, stream);
}

cudaError_t launch_combine_backward(RowDtype dtype, const void* grad_out, const int64_t* index,
                                    const float* scale, const void* rows, void* grad_rows,
                                    float* grad_scale, int64_t num_rows, int64_t hidden,
                                    cudaStream_t stream) {
  return dtype == RowDtype::kFloat32
             ? combine_backward_typed<float>(grad_out, index, scale, rows, grad_rows, grad_scale,
                                             num_rows, hidden, stream)
             : combine_backward_typed<__nv_bfloat16>(grad_out, index, scale, rows, grad_rows,
                                                     grad_scale, num_rows, hidden, stream);
}

}  // namespace megatron_moma
