// Decoding packed SqueezeLLM codes on the CPU (included by the cpu_lut*.cpp sources).
//
// qweight int32 [ceil(in/32)*bits, out]: column n holds the codes of output row n, 32 inputs per
// group packed as one little-endian bit stream of `bits` words (core/packing.py, SPEC A.6).
// With AVX2 each column's LUT sits in registers and vpermps turns 8 codes into 8 fp32 weights;
// 4-bit codes with an fp16 LUT (the default) take a faster byte-shuffle path (cpu_lut_fp16.h).
// Without AVX2/FMA/F16C the same loops run in scalar code.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define SQUEEZE_AVX2 1
#else
#define SQUEEZE_AVX2 0
#endif

namespace squeeze_cpu {

constexpr int kGroup = 32;     // inputs per packing group
constexpr int kMaxRows = 8;    // mat-vec path handles up to this many rows per pass

// --- LUT rows as fp32 --------------------------------------------------------------------------

// Floats per column of a prepared LUT: 16 up to 4 bits (the layout decode_group reads), 2**bits above
// (5 and 6 bits: the widest projections; 4 to 8 bits: the token embedding and output head).
inline int lut_stride(int bits) { return bits <= 4 ? 16 : 1 << bits; }

// Rows [t0, t1) of the lookup table as fp32, lut_stride(bits) floats per row (see decode_group).
inline void fill_luts(const at::Tensor& lut, int bits, int64_t t0, int64_t t1, float* dst) {
  const int entries = 1 << bits, stride = lut_stride(bits);
  const int64_t count = (t1 - t0) * entries;
  const auto type = lut.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16,
              "lookup_table must be float32, float16 or bfloat16, got ", type);
  // Convert the run of rows in one pass into a packed buffer, then spread it to 16-float rows.
  float* packed = entries == stride ? dst : dst + (t1 - t0) * stride - count;  // tail of dst: spreading never overtakes it
  if (type == at::kFloat) {
    std::memcpy(packed, static_cast<const float*>(lut.const_data_ptr()) + t0 * entries, sizeof(float) * count);
  } else if (type == at::kHalf) {
    const auto* src = reinterpret_cast<const uint16_t*>(lut.const_data_ptr()) + t0 * entries;
    int64_t i = 0;
#if SQUEEZE_AVX2
    for (; i + 8 <= count; i += 8)
      _mm256_storeu_ps(packed + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
    for (; i < count; ++i) packed[i] = static_cast<float>(c10::Half(src[i], c10::Half::from_bits()));
  } else {
    const auto* src = reinterpret_cast<const uint16_t*>(lut.const_data_ptr()) + t0 * entries;
    for (int64_t i = 0; i < count; ++i) {
      const uint32_t bits32 = static_cast<uint32_t>(src[i]) << 16;  // bf16 is the top half of an fp32
      std::memcpy(packed + i, &bits32, sizeof(float));
    }
  }
  if (entries < stride) {
    for (int64_t n = 0; n < t1 - t0; ++n) {
      std::memmove(dst + n * 16, packed + n * entries, sizeof(float) * entries);
      if (bits == 2) std::memcpy(dst + n * 16 + 4, dst + n * 16, sizeof(float) * 4);
    }
  }
}

// fp32 scratch of `n` floats, 32-byte aligned (AVX loads of LUT rows).
struct Scratch {
  explicit Scratch(int64_t n) : data(new float[n + 8]) {}
  float* get() { return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(data.get()) + 31) & ~uintptr_t{31}); }
  std::unique_ptr<float[]> data;
};

// --- scalar decoding (any width; the reference for the SIMD code) -------------------------------

// Code k (0..31) of a group whose `bits` words are words[0], words[stride], ...
inline uint32_t group_code(const int32_t* words, int64_t stride, int bits, int k) {
  const int bit = bits * k, word = bit >> 5, shift = bit & 31;
  uint32_t value = static_cast<uint32_t>(words[word * stride]) >> shift;
  if (shift + bits > 32) value |= static_cast<uint32_t>(words[(word + 1) * stride]) << (32 - shift);
  return value & ((1u << bits) - 1u);
}


#if SQUEEZE_AVX2
// --- AVX2 decoding: 32 codes -> 4 registers of 8 fp32 weights ---------------------------------
//
// `lut` is the column's table as prepared by fill_luts: 16 fp32 entries for 4-bit, 8 for 3-bit,
// and for 2-bit its 4 entries twice (vpermps reads 3 index bits, the third belonging to the next
// code; a repeated table makes that bit irrelevant).

// Lanes of `word >> shifts` hold a code in their low bits; vpermps ignores the bits above 3.
inline __m256 lookup8(__m256 table, uint32_t word, __m256i shifts) {
  const __m256i idx = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts);
  return _mm256_permutevar8x32_ps(table, idx);
}

// lut[idx] for 8 codes of 5 or 6 bits: vpermps in each 8-entry slice of the table, then the slices
// chosen by the code's bits 3, 4 (and 5) through blends (measured faster than a gather).
template <int BITS>
inline __m256 lookup_wide(const float* lut, __m256i idx) {
  constexpr int kSlices = (1 << BITS) / 8;
  __m256 v[kSlices];
  for (int t = 0; t < kSlices; ++t) v[t] = _mm256_permutevar8x32_ps(_mm256_load_ps(lut + 8 * t), idx);
  for (int bit = 3, n = kSlices; n > 1; ++bit, n /= 2) {
    const __m256 upper = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 31 - bit));  // this bit -> sign bit
    for (int t = 0; t < n / 2; ++t) v[t] = _mm256_blendv_ps(v[2 * t], v[2 * t + 1], upper);
  }
  return v[0];
}

template <int BITS>
inline void decode_group(const int32_t* col, int64_t stride, const float* lut, __m256 w[4]) {
  if constexpr (BITS > 4) {
    // 5, 6 and 8 bits: a table of 2**BITS floats does not fit a register (8 bits: codes to lanes, then gathers).
    if constexpr (BITS == 8) {
      alignas(32) int32_t idx[kGroup];
      for (int j = 0; j < 8; ++j) {
        const uint32_t word = static_cast<uint32_t>(col[j * stride]);
        for (int t = 0; t < 4; ++t) idx[4 * j + t] = static_cast<int32_t>((word >> (8 * t)) & 255u);
      }
      for (int i = 0; i < 4; ++i)
        w[i] = _mm256_i32gather_ps(lut, _mm256_load_si256(reinterpret_cast<const __m256i*>(idx + 8 * i)), 4);
    } else {
      // 8 codes of 5 or 6 bits are 40 or 48 bits of the group's stream, always inside one 64-bit run of
      // two adjacent words (offsets 0/40/80/120 or 0/48/96/144 bits: at most 24 or 16 into the first):
      // its low half holds codes 0-3 and the run shifted by 4*BITS codes 4-7, one srlv spreads them.
      static_assert(BITS == 5 || BITS == 6, "5, 6 or 8 bits");
      uint32_t word[BITS];
      for (int j = 0; j < BITS; ++j) word[j] = static_cast<uint32_t>(col[j * stride]);
      const __m256i shifts = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 0, BITS, 2 * BITS, 3 * BITS);
      const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
      for (int i = 0; i < 4; ++i) {
        const int bit = 8 * BITS * i, k = bit >> 5;
        const uint64_t run = (static_cast<uint64_t>(word[k]) | static_cast<uint64_t>(word[k + 1]) << 32) >> (bit & 31);
        const __m256i halves = _mm256_set_m128i(_mm_set1_epi32(static_cast<int>(static_cast<uint32_t>(run >> (4 * BITS)))),
                                                _mm_set1_epi32(static_cast<int>(static_cast<uint32_t>(run))));
        const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(halves, shifts), mask);
        w[i] = lookup_wide<BITS>(lut, idx);
      }
    }
  } else if constexpr (BITS == 3) {
    // The 96-bit stream holds code k at bit 3k: four 24-bit chunks of eight codes each.
    const __m256i shifts = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);
    const __m256 table = _mm256_load_ps(lut);
    const uint32_t a = col[0], b = col[stride], c = col[2 * stride];
    w[0] = lookup8(table, a, shifts);
    w[1] = lookup8(table, (a >> 24) | (b << 8), shifts);
    w[2] = lookup8(table, (b >> 16) | (c << 16), shifts);
    w[3] = lookup8(table, c >> 8, shifts);
  } else if constexpr (BITS == 4) {
    const __m256i down = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i up = _mm256_setr_epi32(28, 24, 20, 16, 12, 8, 4, 0);  // bit 3 of each code -> sign bit
    const __m256 lo = _mm256_load_ps(lut), hi = _mm256_load_ps(lut + 8);
    for (int j = 0; j < 4; ++j) {
      const __m256i word = _mm256_set1_epi32(col[j * stride]);
      const __m256i idx = _mm256_srlv_epi32(word, down);
      const __m256 high_half = _mm256_castsi256_ps(_mm256_sllv_epi32(word, up));
      w[j] = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx), high_half);
    }
  } else {  // 2-bit: two words of sixteen codes
    const __m256i low = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    const __m256i high = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
    const __m256 table = _mm256_load_ps(lut);
    for (int j = 0; j < 2; ++j) {
      const uint32_t word = col[j * stride];
      w[2 * j] = lookup8(table, word, low);
      w[2 * j + 1] = lookup8(table, word, high);
    }
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Dot products of columns [t0, t1) with R input rows, walking qweight row by row: each group's
// `BITS` rows are read as contiguous runs (what the hardware prefetcher streams best), and each
// column keeps an 8-lane partial sum per input row in `acc` [(t1-t0) * R].
template <int BITS, int R>
void tile_dots(const int32_t* q, int64_t out, int64_t groups, const float* luts, const float* x, int64_t ldx,
               int64_t t0, int64_t t1, __m256* __restrict acc, float* dots) {
  const int64_t width = t1 - t0;
  for (int64_t i = 0; i < width * R; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const int32_t* words = q + g * BITS * out + t0;
    __m256 xv[R][4];  // this group's inputs, in registers for the whole sweep (acc cannot alias them)
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i) xv[r][i] = _mm256_loadu_ps(x + r * ldx + g * kGroup + 8 * i);
    for (int64_t c = 0; c < width; ++c) {
      // The next group's rows come from memory while this one is decoded: the tile reads only
      // width*4 bytes of each row, too short a run for the hardware prefetcher to catch up.
      if ((c & 15) == 0 && g + 1 < groups)
        for (int j = 0; j < BITS; ++j) _mm_prefetch(reinterpret_cast<const char*>(words + (BITS + j) * out + c), _MM_HINT_T0);
      __m256 w[4];
      decode_group<BITS>(words + c, out, luts + c * (BITS <= 4 ? 16 : 1 << BITS), w);
      __m256* a = acc + c * R;
      for (int r = 0; r < R; ++r) {
        __m256 s = _mm256_fmadd_ps(w[0], xv[r][0], a[r]);
        s = _mm256_fmadd_ps(w[1], xv[r][1], s);
        s = _mm256_fmadd_ps(w[2], xv[r][2], s);
        a[r] = _mm256_fmadd_ps(w[3], xv[r][3], s);
      }
    }
  }
  for (int64_t c = 0; c < width; ++c)
    for (int r = 0; r < R; ++r) dots[c * kMaxRows + r] = hsum(acc[c * R + r]);
}

template <int BITS>
void tile_dots_rows(const int32_t* q, int64_t out, int64_t groups, const float* luts, const float* x, int64_t ldx,
                    int rows, int64_t t0, int64_t t1, __m256* acc, float* dots) {
  switch (rows) {
    case 1: return tile_dots<BITS, 1>(q, out, groups, luts, x, ldx, t0, t1, acc, dots);
    case 2: return tile_dots<BITS, 2>(q, out, groups, luts, x, ldx, t0, t1, acc, dots);
    case 3: return tile_dots<BITS, 3>(q, out, groups, luts, x, ldx, t0, t1, acc, dots);
    case 4: return tile_dots<BITS, 4>(q, out, groups, luts, x, ldx, t0, t1, acc, dots);
    case 5: return tile_dots<BITS, 5>(q, out, groups, luts, x, ldx, t0, t1, acc, dots);
    case 6: return tile_dots<BITS, 6>(q, out, groups, luts, x, ldx, t0, t1, acc, dots);
    case 7: return tile_dots<BITS, 7>(q, out, groups, luts, x, ldx, t0, t1, acc, dots);
    default: return tile_dots<BITS, 8>(q, out, groups, luts, x, ldx, t0, t1, acc, dots);
  }
}
#endif  // SQUEEZE_AVX2

// dots[c * kMaxRows + r] = decoded column t0+c . x[r], for c < t1-t0, r < rows (dense part only).
inline void tile_dots_any(const int32_t* q, int64_t out, int bits, int64_t groups, const float* luts, const float* x,
                   int64_t ldx, int rows, int64_t t0, int64_t t1, float* dots) {
#if SQUEEZE_AVX2
  std::unique_ptr<__m256[]> acc(new __m256[(t1 - t0) * rows]);
  if (bits == 8) return tile_dots_rows<8>(q, out, groups, luts, x, ldx, rows, t0, t1, acc.get(), dots);
  if (bits == 6) return tile_dots_rows<6>(q, out, groups, luts, x, ldx, rows, t0, t1, acc.get(), dots);
  if (bits == 5) return tile_dots_rows<5>(q, out, groups, luts, x, ldx, rows, t0, t1, acc.get(), dots);
  if (bits == 4) return tile_dots_rows<4>(q, out, groups, luts, x, ldx, rows, t0, t1, acc.get(), dots);
  if (bits == 3) return tile_dots_rows<3>(q, out, groups, luts, x, ldx, rows, t0, t1, acc.get(), dots);
  return tile_dots_rows<2>(q, out, groups, luts, x, ldx, rows, t0, t1, acc.get(), dots);
#else
  float w[kGroup];
  const int stride = lut_stride(bits);
  std::fill(dots, dots + (t1 - t0) * kMaxRows, 0.f);
  for (int64_t c = 0; c < t1 - t0; ++c) {
    for (int64_t g = 0; g < groups; ++g) {
      for (int k = 0; k < kGroup; ++k) w[k] = luts[c * stride + group_code(q + g * bits * out + t0 + c, out, bits, k)];
      for (int r = 0; r < rows; ++r) {
        const float* xg = x + r * ldx + g * kGroup;
        float s = 0.f;
        for (int k = 0; k < kGroup; ++k) s += w[k] * xg[k];
        dots[c * kMaxRows + r] += s;
      }
    }
  }
#endif
}

}  // namespace squeeze_cpu
