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

// ---------------------------------------------------------------------------------------------
// Bucket: a stable counting sort of rows by bucket, in tiles of kBucketTileRows rows.
//   1. histogram: rows per (bucket, tile), warp-aggregated atomics (one atomic per distinct
//      bucket in a warp), and rows per token, in one pass over the rows;
//   2. exclusive scans: bucket-major (bucket, tile) counts -> where each tile's rows of each
//      bucket start; per-token counts -> token_offsets;
//   3. scatter: one warp per tile walks its rows in order, 32 at a time; lanes with the same
//      bucket rank themselves by lane (__match_any_sync), so rows keep their order in a bucket;
//   4. positions by token: every position claims a slot of its token with an atomic, then each
//      token's (short) slot list is sorted, so copies come in increasing position.

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kScanThreads = 1024;
constexpr int kBucketThreads = 256;

__device__ __forceinline__ unsigned lanes_below(int lane) { return (1u << lane) - 1u; }

// One past the last row of a tile.
__device__ __forceinline__ int64_t tile_end(int64_t tile, int64_t rows) {
  const int64_t end = (tile + 1) * kBucketTileRows;
  return end < rows ? end : rows;
}

__global__ void bucket_histogram_kernel(const int64_t* __restrict__ token,
                                        const int64_t* __restrict__ bucket, int64_t rows,
                                        int64_t num_tokens, int64_t num_buckets, int64_t tiles,
                                        unsigned long long* __restrict__ tile_counts,
                                        unsigned long long* __restrict__ token_counts) {
  const int lane = threadIdx.x % kWarp;
  const int64_t tile = blockIdx.x;
  const int64_t end = tile_end(tile, rows);
  for (int64_t base = tile * kBucketTileRows; base < end; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    const bool valid = i < end;
    const unsigned active = __ballot_sync(kFullMask, valid);
    if (!valid) continue;
    const int64_t b = bucket[i], t = token[i];
    if (b < 0 || b >= num_buckets || t < 0 || t >= num_tokens) __trap();
    const unsigned peers = __match_any_sync(active, static_cast<unsigned long long>(b));
    if (lane == __ffs(peers) - 1) {
      atomicAdd(tile_counts + b * tiles + tile, static_cast<unsigned long long>(__popc(peers)));
    }
    atomicAdd(token_counts + t, 1ull);
  }
}

// data[i] <- data[0] + ... + data[i-1], by one block of kScanThreads threads.
__global__ void exclusive_scan_kernel(int64_t* __restrict__ data, int64_t n) {
  __shared__ int64_t warp_totals[kScanThreads / kWarp];
  __shared__ int64_t carry;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int64_t base = 0; base < n; base += kScanThreads) {
    const int64_t i = base + threadIdx.x;
    const int64_t value = i < n ? data[i] : 0;
    int64_t inclusive = value;
#pragma unroll
    for (int shift = 1; shift < kWarp; shift *= 2) {
      const int64_t below = __shfl_up_sync(kFullMask, inclusive, shift);
      if (lane >= shift) inclusive += below;
    }
    if (lane == kWarp - 1) warp_totals[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
      int64_t total = warp_totals[lane];
#pragma unroll
      for (int shift = 1; shift < kWarp; shift *= 2) {
        const int64_t below = __shfl_up_sync(kFullMask, total, shift);
        if (lane >= shift) total += below;
      }
      warp_totals[lane] = total;  // now inclusive over warps
    }
    __syncthreads();
    const int64_t before_warp = warp > 0 ? warp_totals[warp - 1] : 0;
    if (i < n) data[i] = carry + before_warp + inclusive - value;
    __syncthreads();
    if (threadIdx.x == 0) carry += warp_totals[kScanThreads / kWarp - 1];
    __syncthreads();
  }
}

// counts[b]: rows of bucket b, from the scanned (bucket, tile) starts before the scatter.
__global__ void bucket_counts_kernel(const int64_t* __restrict__ tile_starts, int64_t tiles,
                                     int64_t num_buckets, int64_t rows,
                                     int64_t* __restrict__ counts) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= num_buckets) return;
  const int64_t next = b + 1 < num_buckets ? tile_starts[(b + 1) * tiles] : rows;
  counts[b] = next - tile_starts[b * tiles];
}

__global__ void bucket_scatter_kernel(const int64_t* __restrict__ token,
                                      const int64_t* __restrict__ bucket, int64_t rows,
                                      int64_t tiles, int64_t* __restrict__ tile_cursor,
                                      int64_t* __restrict__ source_token,
                                      int64_t* __restrict__ order, int64_t* __restrict__ position) {
  const int lane = threadIdx.x % kWarp;
  const int64_t tile = global_warp();
  if (tile >= tiles) return;  // the whole warp
  const int64_t end = tile_end(tile, rows);
  for (int64_t base = tile * kBucketTileRows; base < end; base += kWarp) {
    const int64_t i = base + lane;
    const bool valid = i < end;
    const unsigned active = __ballot_sync(kFullMask, valid);
    if (valid) {
      const int64_t b = bucket[i];
      const unsigned peers = __match_any_sync(active, static_cast<unsigned long long>(b));
      const int leader = __ffs(peers) - 1;
      int64_t* cursor = tile_cursor + b * tiles + tile;
      const int64_t start = __shfl_sync(active, lane == leader ? *cursor : 0, leader);
      const int64_t p = start + __popc(peers & lanes_below(lane));
      if (lane == leader) *cursor = start + __popc(peers);
      order[p] = i;
      position[i] = p;
      source_token[p] = token[i];
    }
    __syncwarp();  // the cursors written in this step are read by other lanes in the next
  }
}

__global__ void claim_token_slots_kernel(const int64_t* __restrict__ source_token, int64_t rows,
                                         const int64_t* __restrict__ token_offsets,
                                         unsigned long long* __restrict__ token_fill,
                                         int64_t* __restrict__ positions_by_token) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= rows) return;
  const int64_t t = source_token[p];
  positions_by_token[token_offsets[t] + static_cast<int64_t>(atomicAdd(token_fill + t, 1ull))] = p;
}

// Insertion sort of each token's positions (a token has as many as the experts that took it).
__global__ void sort_token_slots_kernel(const int64_t* __restrict__ token_offsets,
                                        int64_t num_tokens,
                                        int64_t* __restrict__ positions_by_token) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= num_tokens) return;
  int64_t* slots = positions_by_token + token_offsets[t];
  const int64_t n = token_offsets[t + 1] - token_offsets[t];
  for (int64_t j = 1; j < n; ++j) {
    const int64_t value = slots[j];
    int64_t k = j;
    for (; k > 0 && slots[k - 1] > value; --k) slots[k] = slots[k - 1];
    slots[k] = value;
  }
}

unsigned int blocks_of(int64_t items, int threads) {
  return static_cast<unsigned int>((items + threads - 1) / threads);
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

cudaError_t launch_bucket(const int64_t* token_of_row, const int64_t* bucket_of_row, int64_t rows,
                          int64_t num_tokens, int64_t num_buckets, int64_t* tile_starts,
                          int64_t* token_fill, int64_t* source_token, int64_t* order,
                          int64_t* position, int64_t* counts, int64_t* token_offsets,
                          int64_t* positions_by_token, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;  // counts and token_offsets stay zero
  const int64_t tiles = bucket_tiles(rows);
  auto* tile_counts = reinterpret_cast<unsigned long long*>(tile_starts);
  auto* token_counts = reinterpret_cast<unsigned long long*>(token_offsets);
  bucket_histogram_kernel<<<static_cast<unsigned int>(tiles), kBucketThreads, 0, stream>>>(
      token_of_row, bucket_of_row, rows, num_tokens, num_buckets, tiles, tile_counts,
      token_counts);
  exclusive_scan_kernel<<<1, kScanThreads, 0, stream>>>(tile_starts, num_buckets * tiles);
  exclusive_scan_kernel<<<1, kScanThreads, 0, stream>>>(token_offsets, num_tokens + 1);
  bucket_counts_kernel<<<blocks_of(num_buckets, kBucketThreads), kBucketThreads, 0, stream>>>(
      tile_starts, tiles, num_buckets, rows, counts);
  bucket_scatter_kernel<<<blocks_of(tiles, kWarpsPerBlock), kThreads, 0, stream>>>(
      token_of_row, bucket_of_row, rows, tiles, tile_starts, source_token, order, position);
  claim_token_slots_kernel<<<blocks_of(rows, kBucketThreads), kBucketThreads, 0, stream>>>(
      source_token, rows, token_offsets, reinterpret_cast<unsigned long long*>(token_fill),
      positions_by_token);
  sort_token_slots_kernel<<<blocks_of(num_tokens, kBucketThreads), kBucketThreads, 0, stream>>>(
      token_offsets, num_tokens, positions_by_token);
  return cudaGetLastError();
}

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
