// Decoding of packed LUT codes and the per-group multiply-accumulate, shared by the CUDA kernels
// and by a host build (tests/cuda_ext compile this header with g++ and compare it against the
// torch reference, so the bit twiddling is tested on machines without a GPU).
//
// Layout (core/packing.py): the 32 codes of a packing group fill `BITS` uint32 words as one
// little-endian bit stream; code k occupies stream bits BITS*k .. BITS*k + BITS - 1. For 3 bits,
// codes 10 and 21 straddle two words, exactly as GPTQ / SqueezeLLM pack them.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SQZ_HOST_DEVICE __host__ __device__ __forceinline__
#define SQZ_UNROLL _Pragma("unroll")
#else
#define SQZ_HOST_DEVICE inline
#define SQZ_UNROLL
#endif

namespace squeeze_cuda {

// Code k (0..31) of a group whose words are w[0..BITS-1]. With k a compile-time constant after
// unrolling, word index and shifts fold away and each code costs a shift, an or and a mask.
template <int BITS>
SQZ_HOST_DEVICE uint32_t stream_code(const uint32_t* w, int k) {
  const int bit = BITS * k;
  const int word = bit >> 5;
  const int shift = bit & 31;
  uint32_t code = w[word] >> shift;
  if (shift + BITS > 32) {  // straddles: the high bits start the next word (shift > 0 here)
    code |= w[word + 1] << (32 - shift);
  }
  return code & ((1u << BITS) - 1u);
}

// acc[b] += sum_{k<32} deq[code_k * deq_stride] * xs[b * xs_stride + k] for b < ROWS.
// deq: this output column's LUT (float, one entry per level, `deq_stride` apart: in shared
// memory the LUT is stored level-major so that neighbouring threads hit neighbouring banks).
// xs: the group's 32 inputs of each of the ROWS activation rows (zeros past in_features).
// Every row reuses the one decoded weight: the packed words are read once for all rows.
template <int BITS, int ROWS>
SQZ_HOST_DEVICE void accumulate_group(const uint32_t* w, const float* deq, int deq_stride,
                                      const float* xs, int xs_stride, float* acc) {
  SQZ_UNROLL
  for (int k = 0; k < 32; ++k) {
    const float weight = deq[stream_code<BITS>(w, k) * deq_stride];
    SQZ_UNROLL
    for (int b = 0; b < ROWS; ++b) {
      acc[b] += weight * xs[b * xs_stride + k];
    }
  }
}

}  // namespace squeeze_cuda
