// Host-side interface between the torch binding (lut_cuda_ops.cpp) and the CUDA kernels (*.cu).
//
// Plain C++ with no CUDA or torch types, so that the .cu files compile against the CUDA headers
// alone and the binding against torch's headers alone (a CPU-only torch wheel ships no
// c10/cuda build headers). Every launcher expects tensors already checked by the binding
// (contiguous, on one CUDA device, shapes consistent), runs on `stream` (a cudaStream_t) and
// returns a cudaError_t value (0 = success); `error_string` turns it into text.
#pragma once

#include <cstdint>

namespace squeeze_cuda {

// Element types of activations, lookup tables and dequantized weights.
enum DTypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Rows of activations one mat-vec launch accumulates from the same decoded weights; the
// binding splits larger batches into chunks of this many rows.
constexpr int kMaxGemvRows = 8;
// Inputs per packing group: 32 codes of `bits` bits fill `bits` int32 words (core/packing.py).
constexpr int kGroupSize = 32;
// Packing groups (of 32 inputs) one mat-vec block reduces, chosen per launch between these
// bounds: the largest that still gives kGemvTargetBlocksPerSm blocks per multiprocessor (enough
// resident warps to keep DRAM busy). Fewer groups per block cost extra LUT staging (from L2,
// the LUT is small) and atomics; more cost parallelism. Estimates, to be tuned on a GPU.
constexpr int kGemvMaxGroupsPerBlock = 16;
constexpr int kGemvMinGroupsPerBlock = 2;
constexpr int kGemvTargetBlocksPerSm = 6;
// Packing groups one dequantize block expands (amortises loading the block's LUT slice).
constexpr int kDequantGroupsPerBlock = 8;
// CUDA's limit on gridDim.y, which counts the blocks along the input dimension: the binding
// checks it so that an enormous in_features is a clear error, not a failed launch.
constexpr int64_t kMaxGridY = 65535;

// y[r, n] += sum_k lut[n, code(k, n)] * x[r, k] for r < rows (<= kMaxGemvRows), n < out_features.
// x [rows, in_features]; qweight int32 [ceil(in/32)*bits, out_features]; lut [out, 2**bits];
// y float32 [rows, out_features], pre-filled (zeros or the bias): partial sums are atomically added.
int launch_lut_gemv(const void* x, int x_dtype, int rows, int in_features, const int32_t* qweight,
                    int out_features, int bits, const void* lut, int lut_dtype, float* y, void* stream);

// y[r, n] += sum_{i in row n} vals[i] * x[r, cols[i]]: the CSR residual, nnz split evenly over
// threads whatever the row lengths. rows int32 [out+1], cols int32 [nnz], vals float32 [nnz].
// bad_index: one device int32 the kernel sets to 1 when some cols[i] is outside [0, in_features)
// (that entry is skipped, never read out of bounds); the binding raises then, as the CPU kernel does.
int launch_csr_gemv(const void* x, int x_dtype, int rows, int in_features, const int32_t* sparse_rows,
                    const int32_t* sparse_cols, const float* sparse_vals, int64_t nnz, int out_features,
                    float* y, int32_t* bad_index, void* stream);

// weight_t[k, n] = lut[n, code(k, n)]: the dense part, transposed [in_features, out_features],
// in out_dtype (so that x @ weight_t is a plain GEMM and both reads and writes are coalesced).
// The one-kernel mat-vec (lut_gemv_fused.cu): dense part, CSR residual (sparse_rows null when
// there is none), bias (null or any dtype code) and the store into y [rows, out] in x's dtype.
// Serves rows <= kMaxGemvRows where fused_gemv_supported(); returns cudaErrorInvalidValue elsewhere.
bool fused_gemv_supported(const void* x, int x_dtype, int in_features);
int launch_lut_gemv_fused(const void* x, int x_dtype, int rows, int in_features, const int32_t* qweight,
                          int out_features, int bits, const void* lut, int lut_dtype, const int32_t* sparse_rows,
                          const int32_t* sparse_cols, const float* sparse_vals, const void* bias, int bias_dtype,
                          void* y, int32_t* bad_index, void* stream);

int launch_lut_dequantize(const int32_t* qweight, int in_features, int out_features, int bits,
                          const void* lut, int lut_dtype, void* weight_t, int out_dtype, void* stream);

// weight_t[cols[i], n] += vals[i] for every residual i of row n (duplicates add up). bad_index as
// in launch_csr_gemv: set to 1 for a column outside [0, in_features), whose entry is skipped.
int launch_csr_scatter_add(const int32_t* sparse_rows, const int32_t* sparse_cols, const float* sparse_vals,
                           int64_t nnz, int in_features, int out_features, void* weight_t, int dtype,
                           int32_t* bad_index, void* stream);

const char* error_string(int code);

// True while `stream` is being captured into a CUDA graph (reading a flag back is not allowed then).
bool stream_is_capturing(void* stream);

}  // namespace squeeze_cuda
