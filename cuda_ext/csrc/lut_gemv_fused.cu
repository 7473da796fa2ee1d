// Decode-time LUT mat-vec in one kernel: dense part, CSR residual, bias and the cast to the
// activations' dtype, for 1..8 activation rows.
//
// The first mat-vec (lut_gemv.cu) splits the inputs over blocks and adds partial sums atomically
// into a float32 buffer, so every call also zeroes that buffer and casts it afterwards, and the
// residual is a second kernel: four launches, and on an H200 13-20% of the DRAM bandwidth at
// batch 1 (BENCHMARKS.md, "CUDA kernels"). Here a block owns 32 output columns over all inputs:
// its 16 warps split the inputs, every lane (one column) issues the loads of a chunk of packing
// groups at once, activations are read as 16-byte warp-uniform loads (one L1 transaction serves
// the warp), the warps' sums meet in shared memory, the block adds the CSR entries of its own
// rows there too, and the result is stored once in the output dtype. Needs in_features a multiple
// of 8 and 16-byte aligned activation rows; other shapes go to the first kernels.
#include "lut_common.cuh"
#include "lut_decode.cuh"

namespace squeeze_cuda {
namespace {

constexpr int kFusedColumns = 32;  // one column per lane
constexpr int kFusedWarps = 16;    // the inputs are split over the block's warps
constexpr int kFusedThreads = kFusedColumns * kFusedWarps;
constexpr int kChunkGroups = 4;    // packing groups whose words one lane loads at once

// Eight consecutive activations of one row as float, from one 16-byte load (two for float32).
template <typename T>
__device__ __forceinline__ void load8(const T* row, int k, float* out);

template <>
__device__ __forceinline__ void load8<float>(const float* row, int k, float* out) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(row + k));
  const float4 b = __ldg(reinterpret_cast<const float4*>(row + k + 4));
  out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
  out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
}

template <>
__device__ __forceinline__ void load8<__half>(const __half* row, int k, float* out) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row + k));
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
  SQZ_UNROLL
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

template <>
__device__ __forceinline__ void load8<__nv_bfloat16>(const __nv_bfloat16* row, int k, float* out) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row + k));
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
  SQZ_UNROLL
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

// The words of groups [g, g + kChunkGroups) of one column (zeros past the warp's last group).
template <int BITS>
__device__ __forceinline__ void load_chunk(const uint32_t* __restrict__ column, int g, int g_end, int out_features,
                                           uint32_t* words) {
  SQZ_UNROLL
  for (int c = 0; c < kChunkGroups; ++c) {
    SQZ_UNROLL
    for (int j = 0; j < BITS; ++j) {
      words[c * BITS + j] =
          g + c < g_end ? __ldg(column + (static_cast<int64_t>(g + c) * BITS + j) * out_features) : 0u;
    }
  }
}

// acc[b] += sum over the group's 32 inputs of LUT[code] * x[b][k] (inputs past in_features read as 0).
template <int BITS, int ROWS, typename T>
__device__ __forceinline__ void accumulate_fused_group(const uint32_t* w, const float* lut_column, const T* x,
                                                       int in_features, int k0, float* acc) {
  SQZ_UNROLL
  for (int part = 0; part < 4; ++part) {  // eight inputs at a time
    const int k = k0 + 8 * part;
    if (k >= in_features) break;  // warp-uniform: in_features is a multiple of 8
    float xs[ROWS][8];
    SQZ_UNROLL
    for (int b = 0; b < ROWS; ++b) load8<T>(x + static_cast<int64_t>(b) * in_features, k, xs[b]);
    SQZ_UNROLL
    for (int i = 0; i < 8; ++i) {
      const float weight = lut_column[stream_code<BITS>(w, 8 * part + i) * kFusedColumns];
      SQZ_UNROLL
      for (int b = 0; b < ROWS; ++b) acc[b] = fmaf(weight, xs[b][i], acc[b]);
    }
  }
}

// grid (ceil(out / 32)), block kFusedThreads. y [ROWS, out] in T; bias (any dtype code) or null;
// the CSR residual (nnz may be 0) of the block's rows is added here; a corrupt column sets
// *bad_index and is skipped.
template <int BITS, int ROWS, typename T>
__global__ void __launch_bounds__(kFusedThreads)
lut_gemv_fused_kernel(const T* __restrict__ x, int in_features, const uint32_t* __restrict__ qweight,
                      int out_features, const void* __restrict__ lut, int lut_dtype,
                      const int32_t* __restrict__ row_ptr, const int32_t* __restrict__ cols,
                      const float* __restrict__ vals, const void* __restrict__ bias, int bias_dtype,
                      T* __restrict__ y, int32_t* __restrict__ bad_index) {
  constexpr int kLevels = 1 << BITS;
  __shared__ float lut_s[kLevels * kFusedColumns];             // [level][column]
  __shared__ float partial[kFusedWarps][ROWS][kFusedColumns];  // each warp's sums
  __shared__ float residual[ROWS][kFusedColumns];              // the CSR part of the block's rows

  const int lane = threadIdx.x % kFusedColumns;
  const int warp = threadIdx.x / kFusedColumns;
  const int n0 = blockIdx.x * kFusedColumns;
  const int n = n0 + lane;
  const bool column_in_range = n < out_features;

  for (int i = threadIdx.x; i < kLevels * kFusedColumns; i += kFusedThreads) {
    const int column = n0 + i % kFusedColumns;
    lut_s[i] = column < out_features
                   ? load_as_float(lut, lut_dtype, static_cast<int64_t>(column) * kLevels + i / kFusedColumns)
                   : 0.f;
  }
  for (int i = threadIdx.x; i < ROWS * kFusedColumns; i += kFusedThreads) residual[i / kFusedColumns][i % kFusedColumns] = 0.f;

  // This warp's packing groups: a contiguous share of the input dimension.
  const int groups = (in_features + kGroupSize - 1) / kGroupSize;
  const int per_warp = (groups + kFusedWarps - 1) / kFusedWarps;
  const int g_begin = min(groups, warp * per_warp);
  const int g_end = min(groups, g_begin + per_warp);

  float acc[ROWS];
  SQZ_UNROLL
  for (int b = 0; b < ROWS; ++b) acc[b] = 0.f;
  const uint32_t* column = qweight + (column_in_range ? n : 0);
  uint32_t current[kChunkGroups * BITS];
  uint32_t next[kChunkGroups * BITS];
  if (g_begin < g_end) load_chunk<BITS>(column, g_begin, g_end, out_features, current);
  __syncthreads();  // the LUT slice is staged
  const float* lut_column = lut_s + lane;
  for (int g = g_begin; g < g_end; g += kChunkGroups) {
    if (g + kChunkGroups < g_end) load_chunk<BITS>(column, g + kChunkGroups, g_end, out_features, next);
    SQZ_UNROLL
    for (int c = 0; c < kChunkGroups; ++c) {
      if (g + c < g_end) {
        accumulate_fused_group<BITS, ROWS, T>(current + c * BITS, lut_column, x, in_features, (g + c) * kGroupSize,
                                              acc);
      }
    }
    SQZ_UNROLL
    for (int j = 0; j < kChunkGroups * BITS; ++j) current[j] = next[j];
  }
  SQZ_UNROLL
  for (int b = 0; b < ROWS; ++b) partial[warp][b][lane] = acc[b];

  // The block's own CSR entries, shared out over all its threads.
  if (row_ptr != nullptr) {
    const int rows_here = min(kFusedColumns, out_features - n0);
    const int64_t first = row_ptr[n0];
    const int64_t last = row_ptr[n0 + rows_here];
    for (int64_t e = first + threadIdx.x; e < last; e += kFusedThreads) {
      const int col = cols[e];
      if (col < 0 || col >= in_features) {  // a corrupt file: never read out of bounds, and say so
        *bad_index = 1;
        continue;
      }
      const int local = csr_row_of(row_ptr + n0, rows_here, e);
      const float value = vals[e];
      SQZ_UNROLL
      for (int b = 0; b < ROWS; ++b) {
        atomicAdd(&residual[b][local], value * to_float<T>(x[static_cast<int64_t>(b) * in_features + col]));
      }
    }
  }
  __syncthreads();

  for (int i = threadIdx.x; i < ROWS * kFusedColumns; i += kFusedThreads) {
    const int b = i / kFusedColumns;
    const int c = i % kFusedColumns;
    if (n0 + c >= out_features) continue;
    float sum = residual[b][c];
    SQZ_UNROLL
    for (int w = 0; w < kFusedWarps; ++w) sum += partial[w][b][c];
    if (bias != nullptr) sum += load_as_float(bias, bias_dtype, n0 + c);
    y[static_cast<int64_t>(b) * out_features + n0 + c] = from_float<T>(sum);
  }
}

#define SQZ_FUSED_ROWS_CASE(BITS, ROWS)                                                                     \
  case ROWS:                                                                                                \
    lut_gemv_fused_kernel<BITS, ROWS, T><<<grid, kFusedThreads, 0, stream>>>(                               \
        static_cast<const T*>(x), in_features, qweight, out_features, lut, lut_dtype, row_ptr, cols, vals, \
        bias, bias_dtype, static_cast<T*>(y), bad_index);                                                   \
    return true;

template <int BITS, typename T>
bool launch_fused_for(int rows, dim3 grid, cudaStream_t stream, const void* x, int in_features,
                      const uint32_t* qweight, int out_features, const void* lut, int lut_dtype,
                      const int32_t* row_ptr, const int32_t* cols, const float* vals, const void* bias,
                      int bias_dtype, void* y, int32_t* bad_index) {
  switch (rows) {
    SQZ_FUSED_ROWS_CASE(BITS, 1)
    SQZ_FUSED_ROWS_CASE(BITS, 2)
    SQZ_FUSED_ROWS_CASE(BITS, 3)
    SQZ_FUSED_ROWS_CASE(BITS, 4)
    SQZ_FUSED_ROWS_CASE(BITS, 5)
    SQZ_FUSED_ROWS_CASE(BITS, 6)
    SQZ_FUSED_ROWS_CASE(BITS, 7)
    SQZ_FUSED_ROWS_CASE(BITS, 8)
    default:
      return false;
  }
}
#undef SQZ_FUSED_ROWS_CASE

template <typename T>
bool launch_fused_typed(int bits, int rows, dim3 grid, cudaStream_t stream, const void* x, int in_features,
                        const uint32_t* qweight, int out_features, const void* lut, int lut_dtype,
                        const int32_t* row_ptr, const int32_t* cols, const float* vals, const void* bias,
                        int bias_dtype, void* y, int32_t* bad_index) {
  switch (bits) {
    case 2:
      return launch_fused_for<2, T>(rows, grid, stream, x, in_features, qweight, out_features, lut, lut_dtype,
                                    row_ptr, cols, vals, bias, bias_dtype, y, bad_index);
    case 3:
      return launch_fused_for<3, T>(rows, grid, stream, x, in_features, qweight, out_features, lut, lut_dtype,
                                    row_ptr, cols, vals, bias, bias_dtype, y, bad_index);
    case 4:
      return launch_fused_for<4, T>(rows, grid, stream, x, in_features, qweight, out_features, lut, lut_dtype,
                                    row_ptr, cols, vals, bias, bias_dtype, y, bad_index);
    default:
      return false;
  }
}

}  // namespace

bool fused_gemv_supported(const void* x, int x_dtype, int in_features) {
  const int per_16_bytes = x_dtype == kFloat32 ? 4 : 8;
  return in_features % 8 == 0 && in_features % per_16_bytes == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
}

int launch_lut_gemv_fused(const void* x, int x_dtype, int rows, int in_features, const int32_t* qweight,
                          int out_features, int bits, const void* lut, int lut_dtype, const int32_t* sparse_rows,
                          const int32_t* sparse_cols, const float* sparse_vals, const void* bias, int bias_dtype,
                          void* y, int32_t* bad_index, void* stream) {
  if (rows <= 0 || out_features <= 0) return static_cast<int>(cudaSuccess);
  if (rows > kMaxGemvRows || !fused_gemv_supported(x, x_dtype, in_features)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const dim3 grid((out_features + kFusedColumns - 1) / kFusedColumns);
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  const auto words = reinterpret_cast<const uint32_t*>(qweight);
  bool launched = false;
  switch (x_dtype) {
    case kFloat16:
      launched = launch_fused_typed<__half>(bits, rows, grid, cuda_stream, x, in_features, words, out_features, lut,
                                            lut_dtype, sparse_rows, sparse_cols, sparse_vals, bias, bias_dtype, y,
                                            bad_index);
      break;
    case kBFloat16:
      launched = launch_fused_typed<__nv_bfloat16>(bits, rows, grid, cuda_stream, x, in_features, words,
                                                   out_features, lut, lut_dtype, sparse_rows, sparse_cols,
                                                   sparse_vals, bias, bias_dtype, y, bad_index);
      break;
    default:
      launched = launch_fused_typed<float>(bits, rows, grid, cuda_stream, x, in_features, words, out_features, lut,
                                           lut_dtype, sparse_rows, sparse_cols, sparse_vals, bias, bias_dtype, y,
                                           bad_index);
      break;
  }
  return launched ? launch_status() : static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace squeeze_cuda
