// Prefill / large-batch kernels: expand the packed weight to a dense float16 / bfloat16 /
// float32 matrix (then one tensor-core GEMM does the work), and add the CSR residual into it.
//
// The dense result is transposed, [in_features, out_features], the layout qweight already has:
// a warp reads 32 neighbouring words and writes 32 neighbouring elements, both coalesced, and
// x @ weight_t is an ordinary row-major GEMM for cuBLAS.
#include "lut_common.cuh"
#include "lut_decode.cuh"

namespace squeeze_cuda {
namespace {

constexpr int kDequantThreads = 128;  // one output column per thread, as in the mat-vec
constexpr int kScatterThreads = 256;

// grid (ceil(out / kDequantThreads), ceil(groups / kDequantGroupsPerBlock)).
template <int BITS, typename T>
__global__ void __launch_bounds__(kDequantThreads)
lut_dequantize_kernel(const uint32_t* __restrict__ qweight, int in_features, int out_features,
                      const void* __restrict__ lut, int lut_dtype, T* __restrict__ weight_t) {
  constexpr int kLevels = 1 << BITS;
  __shared__ float deq[kLevels * kDequantThreads];

  const int t = threadIdx.x;
  const int n = blockIdx.x * kDequantThreads + t;
  if (n >= out_features) return;  // no barrier: each thread reads only the LUT entries it wrote
  SQZ_UNROLL
  for (int level = 0; level < kLevels; ++level) {
    deq[level * kDequantThreads + t] = load_as_float(lut, lut_dtype, static_cast<int64_t>(n) * kLevels + level);
  }

  const int groups = (in_features + kGroupSize - 1) / kGroupSize;
  const int g_begin = blockIdx.y * kDequantGroupsPerBlock;
  const int g_end = min(groups, g_begin + kDequantGroupsPerBlock);
  for (int g = g_begin; g < g_end; ++g) {
    uint32_t words[BITS];
    SQZ_UNROLL
    for (int j = 0; j < BITS; ++j) {
      words[j] = __ldg(qweight + (static_cast<int64_t>(g) * BITS + j) * out_features + n);
    }
    SQZ_UNROLL
    for (int k = 0; k < kGroupSize; ++k) {
      const int input = g * kGroupSize + k;
      if (input < in_features) {  // the padding codes of the last group are dropped
        weight_t[static_cast<int64_t>(input) * out_features + n] =
            from_float<T>(deq[stream_code<BITS>(words, k) * kDequantThreads + t]);
      }
    }
  }
}

// One residual per thread: weight_t[cols[i], row(i)] += vals[i]. Atomic, so duplicate entries
// add up as in any CSR matrix (the torch reference does the same).
template <typename T>
__global__ void __launch_bounds__(kScatterThreads)
csr_scatter_add_kernel(const int32_t* __restrict__ row_ptr, const int32_t* __restrict__ cols,
                       const float* __restrict__ vals, int64_t nnz, int in_features, int out_features,
                       T* __restrict__ weight_t, int32_t* __restrict__ bad_index) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kScatterThreads + threadIdx.x;
  if (i >= nnz) return;
  const int col = cols[i];
  if (col < 0 || col >= in_features) {  // a corrupt file: never write out of bounds, and say so
    *bad_index = 1;
    return;
  }
  const int row = csr_row_of(row_ptr, out_features, i);
  atomic_add_any(weight_t + static_cast<int64_t>(col) * out_features + row, vals[i]);
}

template <int BITS>
int launch_dequantize_for_bits(dim3 grid, cudaStream_t stream, const uint32_t* qweight, int in_features,
                               int out_features, const void* lut, int lut_dtype, void* weight_t, int out_dtype) {
  switch (out_dtype) {
    case kFloat32:
      lut_dequantize_kernel<BITS, float><<<grid, kDequantThreads, 0, stream>>>(
          qweight, in_features, out_features, lut, lut_dtype, static_cast<float*>(weight_t));
      break;
    case kFloat16:
      lut_dequantize_kernel<BITS, __half><<<grid, kDequantThreads, 0, stream>>>(
          qweight, in_features, out_features, lut, lut_dtype, static_cast<__half*>(weight_t));
      break;
    case kBFloat16:
      lut_dequantize_kernel<BITS, __nv_bfloat16><<<grid, kDequantThreads, 0, stream>>>(
          qweight, in_features, out_features, lut, lut_dtype, static_cast<__nv_bfloat16*>(weight_t));
      break;
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
  return launch_status();
}

}  // namespace

int launch_lut_dequantize(const int32_t* qweight, int in_features, int out_features, int bits,
                          const void* lut, int lut_dtype, void* weight_t, int out_dtype, void* stream) {
  if (in_features <= 0 || out_features <= 0) return static_cast<int>(cudaSuccess);
  const int groups = (in_features + kGroupSize - 1) / kGroupSize;
  const dim3 grid((out_features + kDequantThreads - 1) / kDequantThreads,
                  (groups + kDequantGroupsPerBlock - 1) / kDequantGroupsPerBlock);
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  const auto words = reinterpret_cast<const uint32_t*>(qweight);
  switch (bits) {
    case 2:
      return launch_dequantize_for_bits<2>(grid, cuda_stream, words, in_features, out_features, lut, lut_dtype,
                                           weight_t, out_dtype);
    case 3:
      return launch_dequantize_for_bits<3>(grid, cuda_stream, words, in_features, out_features, lut, lut_dtype,
                                           weight_t, out_dtype);
    case 4:
      return launch_dequantize_for_bits<4>(grid, cuda_stream, words, in_features, out_features, lut, lut_dtype,
                                           weight_t, out_dtype);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

int launch_csr_scatter_add(const int32_t* sparse_rows, const int32_t* sparse_cols, const float* sparse_vals,
                           int64_t nnz, int in_features, int out_features, void* weight_t, int dtype,
                           int32_t* bad_index, void* stream) {
  if (nnz <= 0 || out_features <= 0) return static_cast<int>(cudaSuccess);
  const auto blocks = static_cast<unsigned int>((nnz + kScatterThreads - 1) / kScatterThreads);
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32:
      csr_scatter_add_kernel<float><<<blocks, kScatterThreads, 0, cuda_stream>>>(
          sparse_rows, sparse_cols, sparse_vals, nnz, in_features, out_features, static_cast<float*>(weight_t),
          bad_index);
      break;
    case kFloat16:
      csr_scatter_add_kernel<__half><<<blocks, kScatterThreads, 0, cuda_stream>>>(
          sparse_rows, sparse_cols, sparse_vals, nnz, in_features, out_features, static_cast<__half*>(weight_t),
          bad_index);
      break;
    case kBFloat16:
      csr_scatter_add_kernel<__nv_bfloat16><<<blocks, kScatterThreads, 0, cuda_stream>>>(
          sparse_rows, sparse_cols, sparse_vals, nnz, in_features, out_features,
          static_cast<__nv_bfloat16*>(weight_t), bad_index);
      break;
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
  return launch_status();
}

}  // namespace squeeze_cuda
