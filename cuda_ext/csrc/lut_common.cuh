// Device helpers shared by the kernels: typed loads and stores by runtime dtype code, a portable
// atomic add for 16-bit floats, and the launch error check. CUDA headers only (see lut_cuda.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "lut_cuda.h"

namespace squeeze_cuda {

// Element i of a float32 / float16 / bfloat16 array, as float. Used only where data is staged
// (LUTs and activations into shared memory), so the switch is off the hot loop.
__device__ __forceinline__ float load_as_float(const void* data, int dtype, int64_t i) {
  switch (dtype) {
    case kFloat16:
      return __half2float(static_cast<const __half*>(data)[i]);
    case kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(data)[i]);
    default:
      return static_cast<const float*>(data)[i];
  }
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float bits_to_float(unsigned short bits, __half) {
  return __half2float(__ushort_as_half(bits));
}
__device__ __forceinline__ float bits_to_float(unsigned short bits, __nv_bfloat16) {
  return __bfloat162float(__ushort_as_bfloat16(bits));
}
__device__ __forceinline__ unsigned short float_to_bits(float v, __half) {
  return __half_as_ushort(__float2half_rn(v));
}
__device__ __forceinline__ unsigned short float_to_bits(float v, __nv_bfloat16) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

// *address += value, atomically, for float16 / bfloat16 storage on every architecture (native
// 16-bit float atomics need sm_70 / sm_80): compare-and-swap on the aligned 32-bit word holding
// the element, with the sum taken in float32. Only the rare sparse residuals go through here.
template <typename T>
__device__ void atomic_add_16bit(T* address, float value) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(address);
  unsigned int* word = reinterpret_cast<unsigned int*>(addr & ~static_cast<uintptr_t>(3));
  const unsigned int shift = (addr & 2) ? 16u : 0u;
  unsigned int old = *word;
  unsigned int assumed;
  do {
    assumed = old;
    const unsigned short current = static_cast<unsigned short>((assumed >> shift) & 0xffffu);
    const unsigned short updated = float_to_bits(bits_to_float(current, T()) + value, T());
    const unsigned int replaced = (assumed & ~(0xffffu << shift)) | (static_cast<unsigned int>(updated) << shift);
    old = atomicCAS(word, assumed, replaced);
  } while (assumed != old);
}

__device__ __forceinline__ void atomic_add_any(float* address, float value) { atomicAdd(address, value); }
__device__ __forceinline__ void atomic_add_any(__half* address, float value) { atomic_add_16bit(address, value); }
__device__ __forceinline__ void atomic_add_any(__nv_bfloat16* address, float value) {
  atomic_add_16bit(address, value);
}

// The row of CSR entry i: the largest r < out_rows with row_ptr[r] <= i (skips empty rows).
__device__ __forceinline__ int csr_row_of(const int32_t* row_ptr, int out_rows, int64_t i) {
  int lo = 0;
  int hi = out_rows - 1;
  while (lo < hi) {
    const int mid = lo + (hi - lo + 1) / 2;
    if (row_ptr[mid] <= i) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// The launch's own error (bad configuration) without waiting for the kernel to finish.
inline int launch_status() { return static_cast<int>(cudaGetLastError()); }

}  // namespace squeeze_cuda
