// Decode-time kernels: LUT mat-vec for 1..8 activation rows, and the balanced CSR residual.
//
// Unlike the original SqueezeLLM kernels (SPEC B), every index is bounds-checked (any in/out
// size works: 576 x 192 as well as 4096 x 11008), the rows of a small batch are accumulated
// from one read of the packed weights instead of a serial loop over the batch, and the sparse
// residual is split evenly over threads by entry, not by row.
#include "lut_common.cuh"
#include "lut_decode.cuh"

namespace squeeze_cuda {
namespace {

// One output column per thread: a warp reads 32 neighbouring int32 words of a qweight row
// (128 contiguous bytes), and the block's LUT slice sits level-major in shared memory so that
// a warp's LUT reads hit 32 different banks.
constexpr int kGemvThreads = 128;
// The BITS words of packing group g of one output column (stride out_features between words).
template <int BITS>
__device__ __forceinline__ void load_group_words(const uint32_t* __restrict__ column, int g, int out_features,
                                                 uint32_t* words) {
  SQZ_UNROLL
  for (int j = 0; j < BITS; ++j) {
    words[j] = __ldg(column + (static_cast<int64_t>(g) * BITS + j) * out_features);
  }
}

// Dynamic shared memory of one mat-vec block: the LUT slice and the staged activations.
template <int BITS, int ROWS>
constexpr size_t gemv_shared_bytes(int groups_per_block) {
  return sizeof(float) * ((size_t{1} << BITS) * kGemvThreads + size_t{ROWS} * groups_per_block * kGroupSize);
}

// grid (ceil(out / kGemvThreads), ceil(groups / groups_per_block)); each block reduces its
// slice of inputs for its columns and atomically adds the partial sums into y (float32).
template <int BITS, int ROWS>
__global__ void __launch_bounds__(kGemvThreads)
lut_gemv_kernel(const void* __restrict__ x, int x_dtype, int in_features, const uint32_t* __restrict__ qweight,
                int out_features, const void* __restrict__ lut, int lut_dtype, int groups_per_block,
                float* __restrict__ y) {
  constexpr int kLevels = 1 << BITS;
  extern __shared__ float shared[];
  float* deq = shared;                          // [level][thread]
  float* xs = shared + kLevels * kGemvThreads;  // [row][input of the slice]
  const int slice = groups_per_block * kGroupSize;

  const int t = threadIdx.x;
  const int n = blockIdx.x * kGemvThreads + t;
  const bool column_in_range = n < out_features;
  const int groups = (in_features + kGroupSize - 1) / kGroupSize;
  const int g_begin = blockIdx.y * groups_per_block;
  const int g_end = min(groups, g_begin + groups_per_block);
  const int k_begin = g_begin * kGroupSize;

  SQZ_UNROLL
  for (int level = 0; level < kLevels; ++level) {
    deq[level * kGemvThreads + t] =
        column_in_range ? load_as_float(lut, lut_dtype, static_cast<int64_t>(n) * kLevels + level) : 0.f;
  }
  // Inputs past in_features meet the padding codes (0): they must contribute exactly zero.
  for (int i = t; i < ROWS * slice; i += kGemvThreads) {
    const int row = i / slice;
    const int k = k_begin + i % slice;
    xs[i] = k < in_features ? load_as_float(x, x_dtype, static_cast<int64_t>(row) * in_features + k) : 0.f;
  }
  __syncthreads();
  if (!column_in_range) return;  // no barrier follows

  float acc[ROWS];
  SQZ_UNROLL
  for (int b = 0; b < ROWS; ++b) acc[b] = 0.f;

  // The next group's words are requested before the current group is decoded, so every thread
  // keeps a load in flight while it computes; with several blocks per SM this should hide DRAM
  // latency. A deeper prefetch (more groups ahead) is the first thing to try if a GPU run shows
  // the kernel below ~70% of peak bandwidth (it also multiplies compile time).
  const uint32_t* column = qweight + n;
  uint32_t current[BITS];
  uint32_t next[BITS] = {};
  load_group_words<BITS>(column, g_begin, out_features, current);
  for (int g = g_begin; g < g_end; ++g) {
    if (g + 1 < g_end) load_group_words<BITS>(column, g + 1, out_features, next);
    accumulate_group<BITS, ROWS>(current, deq + t, kGemvThreads, xs + (g - g_begin) * kGroupSize, slice, acc);
    SQZ_UNROLL
    for (int j = 0; j < BITS; ++j) current[j] = next[j];
  }
  SQZ_UNROLL
  for (int b = 0; b < ROWS; ++b) atomicAdd(y + static_cast<int64_t>(b) * out_features + n, acc[b]);
}

// Each thread sums kCsrEntriesPerThread consecutive residuals (the same work whatever the row
// lengths), adding its running sums into y whenever it crosses into the next row. The rows of
// the batch are a runtime count (<= kMaxGemvRows): loops run to the maximum with a guard, so
// the sums stay in registers and one kernel serves every batch size.
constexpr int kCsrThreads = 256;
constexpr int kCsrEntriesPerThread = 8;

__device__ __forceinline__ void flush_row_sums(float* acc, int rows, int row, int out_features, float* y) {
  SQZ_UNROLL
  for (int b = 0; b < kMaxGemvRows; ++b) {
    if (b < rows) atomicAdd(y + static_cast<int64_t>(b) * out_features + row, acc[b]);
    acc[b] = 0.f;
  }
}

__global__ void __launch_bounds__(kCsrThreads)
csr_gemv_kernel(const void* __restrict__ x, int x_dtype, int rows, int in_features,
                const int32_t* __restrict__ row_ptr, const int32_t* __restrict__ cols,
                const float* __restrict__ vals, int64_t nnz, int out_features, float* __restrict__ y,
                int32_t* __restrict__ bad_index) {
  const int64_t begin = (static_cast<int64_t>(blockIdx.x) * kCsrThreads + threadIdx.x) * kCsrEntriesPerThread;
  if (begin >= nnz) return;
  const int64_t end = begin + kCsrEntriesPerThread < nnz ? begin + kCsrEntriesPerThread : nnz;

  int row = csr_row_of(row_ptr, out_features, begin);
  float acc[kMaxGemvRows] = {};
  bool pending = false;
  for (int64_t i = begin; i < end; ++i) {
    while (row + 1 < out_features && row_ptr[row + 1] <= i) {
      if (pending) flush_row_sums(acc, rows, row, out_features, y);
      pending = false;
      ++row;
    }
    const int col = cols[i];
    if (col < 0 || col >= in_features) {  // a corrupt file: never read out of bounds, and say so
      *bad_index = 1;
      continue;
    }
    const float value = vals[i];
    SQZ_UNROLL
    for (int b = 0; b < kMaxGemvRows; ++b) {
      if (b < rows) acc[b] += value * load_as_float(x, x_dtype, static_cast<int64_t>(b) * in_features + col);
    }
    pending = true;
  }
  if (pending) flush_row_sums(acc, rows, row, out_features, y);
}

#define SQZ_GEMV_ROWS_CASE(BITS, ROWS)                                                                    \
  case ROWS:                                                                                              \
    lut_gemv_kernel<BITS, ROWS><<<grid, kGemvThreads, gemv_shared_bytes<BITS, ROWS>(groups_per_block),    \
                                  stream>>>(x, x_dtype, in_features, qweight, out_features, lut, lut_dtype, \
                                            groups_per_block, y);                                          \
    return true;

template <int BITS>
bool launch_gemv_for_bits(int rows, dim3 grid, int groups_per_block, cudaStream_t stream, const void* x,
                          int x_dtype, int in_features, const uint32_t* qweight, int out_features, const void* lut,
                          int lut_dtype, float* y) {
  switch (rows) {
    SQZ_GEMV_ROWS_CASE(BITS, 1)
    SQZ_GEMV_ROWS_CASE(BITS, 2)
    SQZ_GEMV_ROWS_CASE(BITS, 3)
    SQZ_GEMV_ROWS_CASE(BITS, 4)
    SQZ_GEMV_ROWS_CASE(BITS, 5)
    SQZ_GEMV_ROWS_CASE(BITS, 6)
    SQZ_GEMV_ROWS_CASE(BITS, 7)
    SQZ_GEMV_ROWS_CASE(BITS, 8)
    default:
      return false;
  }
}
#undef SQZ_GEMV_ROWS_CASE

// The largest groups-per-block (a power of two within the bounds) that still makes
// kGemvTargetBlocksPerSm blocks per multiprocessor, and never more than kMaxGridY block rows.
int gemv_groups_per_block(int groups, int column_blocks) {
  int device = 0;
  int multiprocessors = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    multiprocessors = 1;
  }
  const int64_t target_blocks = static_cast<int64_t>(kGemvTargetBlocksPerSm) * multiprocessors;
  int per_block = kGemvMaxGroupsPerBlock;
  while (per_block > kGemvMinGroupsPerBlock &&
         static_cast<int64_t>(column_blocks) * ((groups + per_block - 1) / per_block) < target_blocks) {
    per_block /= 2;
  }
  while (per_block < kGemvMaxGroupsPerBlock && (groups + per_block - 1) / per_block > kMaxGridY) per_block *= 2;
  return per_block;
}

}  // namespace

int launch_lut_gemv(const void* x, int x_dtype, int rows, int in_features, const int32_t* qweight,
                    int out_features, int bits, const void* lut, int lut_dtype, float* y, void* stream) {
  if (rows <= 0 || in_features <= 0 || out_features <= 0) return static_cast<int>(cudaSuccess);
  const int groups = (in_features + kGroupSize - 1) / kGroupSize;
  const int column_blocks = (out_features + kGemvThreads - 1) / kGemvThreads;
  const int groups_per_block = gemv_groups_per_block(groups, column_blocks);
  const dim3 grid(column_blocks, (groups + groups_per_block - 1) / groups_per_block);
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  const auto words = reinterpret_cast<const uint32_t*>(qweight);
  bool launched = false;
  switch (bits) {
    case 2:
      launched = launch_gemv_for_bits<2>(rows, grid, groups_per_block, cuda_stream, x, x_dtype, in_features,
                                         words, out_features, lut, lut_dtype, y);
      break;
    case 3:
      launched = launch_gemv_for_bits<3>(rows, grid, groups_per_block, cuda_stream, x, x_dtype, in_features,
                                         words, out_features, lut, lut_dtype, y);
      break;
    case 4:
      launched = launch_gemv_for_bits<4>(rows, grid, groups_per_block, cuda_stream, x, x_dtype, in_features,
                                         words, out_features, lut, lut_dtype, y);
      break;
    default:
      break;
  }
  return launched ? launch_status() : static_cast<int>(cudaErrorInvalidValue);
}

int launch_csr_gemv(const void* x, int x_dtype, int rows, int in_features, const int32_t* sparse_rows,
                    const int32_t* sparse_cols, const float* sparse_vals, int64_t nnz, int out_features,
                    float* y, int32_t* bad_index, void* stream) {
  if (rows <= 0 || nnz <= 0 || out_features <= 0) return static_cast<int>(cudaSuccess);
  const int64_t per_block = static_cast<int64_t>(kCsrThreads) * kCsrEntriesPerThread;
  const auto blocks = static_cast<unsigned int>((nnz + per_block - 1) / per_block);
  if (rows > kMaxGemvRows) return static_cast<int>(cudaErrorInvalidValue);
  csr_gemv_kernel<<<blocks, kCsrThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      x, x_dtype, rows, in_features, sparse_rows, sparse_cols, sparse_vals, nnz, out_features, y, bad_index);
  return launch_status();
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

bool stream_is_capturing(void* stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  return cudaStreamIsCapturing(static_cast<cudaStream_t>(stream), &status) == cudaSuccess &&
         status != cudaStreamCaptureStatusNone;
}

}  // namespace squeeze_cuda
