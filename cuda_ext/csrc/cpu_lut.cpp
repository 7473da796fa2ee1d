// CPU kernels for SqueezeLinear: y = x @ (LUT[codes] + S)^T + bias, reading the packed codes directly.
//
// qweight int32 [ceil(in/32)*bits, out]: column n holds the codes of output row n, 32 inputs per
// group packed as one little-endian bit stream of `bits` words (core/packing.py, SPEC A.6).
// Decoding never leaves registers on the mat-vec path: each column's LUT (8 or 16 fp32 entries)
// sits in one or two AVX registers and vpermps turns 8 codes into 8 weights at once, so the only
// memory traffic is the packed codes (the bottleneck at batch 1), the input and the CSR residual.
// Larger batches (prefill) dequantize a tile of rows to fp32 and hand it to the BLAS GEMM.
//
// Without AVX2/FMA/F16C (another CPU, other compiler flags) the same loops run in scalar code.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <pthread.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define SQUEEZE_AVX2 1
#else
#define SQUEEZE_AVX2 0
#endif

namespace {

constexpr int kGroup = 32;     // inputs per packing group
constexpr int kMaxRows = 8;    // mat-vec path handles up to this many rows per pass

// --- LUT rows as fp32 --------------------------------------------------------------------------

// Rows [t0, t1) of the lookup table as fp32, 16 floats per row (see decode_group for the layout).
void fill_luts(const at::Tensor& lut, int bits, int64_t t0, int64_t t1, float* dst) {
  const int entries = 1 << bits;
  const int64_t count = (t1 - t0) * entries;
  const auto type = lut.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16,
              "lookup_table must be float32, float16 or bfloat16, got ", type);
  // Convert the run of rows in one pass into a packed buffer, then spread it to 16-float rows.
  float* packed = entries == 16 ? dst : dst + (t1 - t0) * 16 - count;  // tail of dst: spreading never overtakes it
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
  if (entries < 16) {
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

template <int BITS>
inline void decode_group(const int32_t* col, int64_t stride, const float* lut, __m256 w[4]) {
  if constexpr (BITS == 3) {
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
      __m256 w[4];
      decode_group<BITS>(words + c, out, luts + c * 16, w);
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
void tile_dots_any(const int32_t* q, int64_t out, int bits, int64_t groups, const float* luts, const float* x,
                   int64_t ldx, int rows, int64_t t0, int64_t t1, float* dots) {
#if SQUEEZE_AVX2
  std::unique_ptr<__m256[]> acc(new __m256[(t1 - t0) * rows]);
  if (bits == 4) return tile_dots_rows<4>(q, out, groups, luts, x, ldx, rows, t0, t1, acc.get(), dots);
  if (bits == 3) return tile_dots_rows<3>(q, out, groups, luts, x, ldx, rows, t0, t1, acc.get(), dots);
  return tile_dots_rows<2>(q, out, groups, luts, x, ldx, rows, t0, t1, acc.get(), dots);
#else
  float w[kGroup];
  std::fill(dots, dots + (t1 - t0) * kMaxRows, 0.f);
  for (int64_t c = 0; c < t1 - t0; ++c) {
    for (int64_t g = 0; g < groups; ++g) {
      for (int k = 0; k < kGroup; ++k) w[k] = luts[c * 16 + group_code(q + g * bits * out + t0 + c, out, bits, k)];
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

// --- checks shared by both paths ----------------------------------------------------------------

struct Sparse {
  const int32_t* rows = nullptr;
  const int32_t* cols = nullptr;
  const float* vals = nullptr;
  int64_t nnz = 0;
};

// Entries [begin, end) of CSR row n, or an empty range (and `bad` set) when the pointer is broken.
inline std::pair<int64_t, int64_t> csr_range(const Sparse& s, int64_t n, std::atomic<bool>& bad) {
  const int64_t begin = s.rows[n], end = s.rows[n + 1];
  if (begin < 0 || end < begin || end > s.nnz) {
    bad = true;
    return {0, 0};
  }
  return {begin, end};
}

// The weight tensors made contiguous (and the CSR part int32/fp32), checked against each other.
struct Weights {
  at::Tensor qweight, lut, rows, cols, vals;
  Sparse sparse;
};

Weights prepare(const at::Tensor& qweight, const at::Tensor& lut, int64_t bits, int64_t in_features,
                const c10::optional<at::Tensor>& rows, const c10::optional<at::Tensor>& cols,
                const c10::optional<at::Tensor>& vals) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4, "bits must be 2, 3 or 4, got ", bits);
  TORCH_CHECK(qweight.device().is_cpu() && lut.device().is_cpu(), "the CPU kernel needs CPU tensors");
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.dim() == 2, "qweight must be int32 [ceil(in/32)*bits, out]");
  const int64_t groups = (in_features + kGroup - 1) / kGroup, out = qweight.size(1);
  TORCH_CHECK(qweight.size(0) == groups * bits, "qweight has ", qweight.size(0), " rows, expected ", groups * bits,
              " for ", in_features, " inputs of ", bits, " bits");
  TORCH_CHECK(lut.dim() == 2 && lut.size(0) == out && lut.size(1) == (1 << bits),
              "lookup_table must be [out, 2**bits] = [", out, ", ", 1 << bits, "]");
  Weights w;
  w.qweight = qweight.contiguous();
  const auto t = lut.scalar_type();
  w.lut = (t == at::kFloat || t == at::kHalf || t == at::kBFloat16) ? lut.contiguous() : lut.to(at::kFloat).contiguous();
  if (!vals.has_value() || vals->numel() == 0) return w;
  TORCH_CHECK(rows.has_value() && cols.has_value(), "sparse_vals given without sparse_rows/sparse_cols");
  TORCH_CHECK(rows->numel() == out + 1, "sparse_rows must have out+1 = ", out + 1, " entries");
  TORCH_CHECK(cols->numel() == vals->numel(), "sparse_cols and sparse_vals must have the same length");
  w.rows = rows->to(at::kInt).contiguous();
  w.cols = cols->to(at::kInt).contiguous();
  w.vals = vals->to(at::kFloat).contiguous();
  w.sparse = {w.rows.data_ptr<int32_t>(), w.cols.data_ptr<int32_t>(), w.vals.data_ptr<float>(), w.vals.numel()};
  return w;
}

// x [..., in] (any float dtype) -> fp32 [rows, ceil(in/32)*32], padded with zeros.
at::Tensor padded_input(const at::Tensor& x2d, int64_t in_features) {
  const int64_t padded = (in_features + kGroup - 1) / kGroup * kGroup;
  if (padded == in_features) return x2d.to(at::kFloat).contiguous();
  at::Tensor xp = at::zeros({x2d.size(0), padded}, x2d.options().dtype(at::kFloat));
  xp.narrow(1, 0, in_features).copy_(x2d);
  return xp;
}

// --- work sharing ---------------------------------------------------------------------------------
//
// Chunks of a call are claimed from a shared counter by the caller and by helper threads, so the
// caller waits only for chunks already claimed, never for a helper that has not started. An OpenMP
// team instead stalls every call until its last thread gets a time slice: on a busy 2-core machine
// that made decode 7x slower than one thread. Helpers spin briefly after each job (kernel calls come
// back to back while decoding, and waking a sleeping thread costs as long as a small call), then
// sleep. A helper that wakes late finds no chunk left and never touches the finished call's data.

struct Job {
  std::atomic<int64_t> next{0}, done{0};
  int64_t chunks = 0;
  std::function<void(int64_t)> body;
  // Runs chunks until none is left.
  void drain() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      body(c);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

class Helpers {
 public:
  static Helpers& instance() { return *slot(); }

  // Publish `job` to up to `count` helper threads (started on first need).
  void publish(const std::shared_ptr<Job>& job, int64_t count) {
    std::lock_guard<std::mutex> lock(mutex_);
    while (static_cast<int64_t>(started_) < count) {
      std::thread([this] { loop(); }).detach();
      ++started_;
    }
    job_ = job;
    generation_.fetch_add(1, std::memory_order_release);
    if (sleeping_ > 0) wake_.notify_all();
  }

 private:
  void loop() {
    uint64_t seen = generation_.load(std::memory_order_acquire);
    for (;;) {
      const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(300);
      for (int i = 0; generation_.load(std::memory_order_acquire) == seen; ++i) {
        if ((i & 63) == 63) {
          if (std::chrono::steady_clock::now() > spin_until) break;
          std::this_thread::yield();  // let other runnable threads (torch's own) have the core
        }
#if SQUEEZE_AVX2
        _mm_pause();
#endif
      }
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        ++sleeping_;
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        --sleeping_;
        seen = generation_.load(std::memory_order_acquire);
        job = job_;
      }
      if (job) job->drain();
    }
  }

  // Never destroyed (detached threads may outlive main); a forked child, which has none of the
  // threads and maybe a locked mutex, starts over with a fresh instance.
  static Helpers*& slot() {
    static Helpers* helpers = [] {
      pthread_atfork(nullptr, nullptr, [] { slot() = new Helpers(); });
      return new Helpers();
    }();
    return helpers;
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::shared_ptr<Job> job_;
  size_t started_ = 0;
  int sleeping_ = 0;
};

// body(c) for every chunk c in [0, chunks), shared with up to get_num_threads()-1 helpers.
// body must not throw (errors are flagged and checked by the caller afterwards).
template <typename Body>
void parallel_chunks(int64_t chunks, const Body& body) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), chunks);
  if (threads <= 1 || at::in_parallel_region()) {
    for (int64_t c = 0; c < chunks; ++c) body(c);
    return;
  }
  auto job = std::make_shared<Job>();
  job->chunks = chunks;
  job->body = [&body](int64_t c) { body(c); };  // a late helper only calls it for a claimed chunk
  Helpers::instance().publish(job, threads - 1);
  job->drain();
  for (int i = 0; job->done.load(std::memory_order_acquire) < chunks; ++i) {
    if ((i & 63) == 63) std::this_thread::yield();  // a helper was preempted inside its chunk
  }
}

// --- mat-vec path (few rows) --------------------------------------------------------------------

// Columns per chunk of work: their partial sums (8 floats per row and column) and LUTs stay in L1.
inline int64_t tile_width(int64_t rows) { return rows <= 2 ? 256 : 64; }

// y[r, n] = decoded column n . x[r] + sparse row n . x[r] + bias[n], for rows r < rows <= kMaxRows.
void lut_matvec(const at::Tensor& xp, const at::Tensor& qweight, const at::Tensor& lut, int bits, int64_t in_features,
                const Sparse& sp, const float* bias, at::Tensor& y, int64_t row0, int64_t rows) {
  const int64_t out = qweight.size(1), groups = qweight.size(0) / bits, ldx = xp.size(1);
  const int32_t* q = qweight.data_ptr<int32_t>();
  const float* x = xp.data_ptr<float>() + row0 * ldx;
  float* yp = y.data_ptr<float>() + row0 * out;
  const int64_t width = tile_width(rows);
  std::atomic<bool> bad{false};
  parallel_chunks((out + width - 1) / width, [&](int64_t chunk) {
    const int64_t t0 = chunk * width, t1 = std::min(out, t0 + width);
    Scratch luts(width * 16);
    std::vector<float> dots(width * kMaxRows);
    fill_luts(lut, bits, t0, t1, luts.get());
    tile_dots_any(q, out, bits, groups, luts.get(), x, ldx, static_cast<int>(rows), t0, t1, dots.data());
    for (int64_t n = t0; n < t1; ++n) {
      float* d = dots.data() + (n - t0) * kMaxRows;
      if (sp.nnz) {
        const auto [begin, end] = csr_range(sp, n, bad);
        for (int64_t i = begin; i < end; ++i) {
          const int64_t k = sp.cols[i];
          if (k < 0 || k >= in_features) { bad = true; continue; }
          for (int64_t r = 0; r < rows; ++r) d[r] += sp.vals[i] * x[r * ldx + k];
        }
      }
      const float b = bias ? bias[n] : 0.f;
      for (int64_t r = 0; r < rows; ++r) yp[r * out + n] = d[r] + b;
    }
  });
  TORCH_CHECK(!bad, "the sparse residual's CSR indices are out of range: the weights are corrupt");
}

// --- dequantize (prefill path and tests) --------------------------------------------------------

// The 32 fp32 weights of one group of one column (LUT part only).
inline void decode_to(const int32_t* col, int64_t stride, int bits, const float* lut, float* dst) {
#if SQUEEZE_AVX2
  __m256 v[4];
  if (bits == 4) decode_group<4>(col, stride, lut, v);
  else if (bits == 3) decode_group<3>(col, stride, lut, v);
  else decode_group<2>(col, stride, lut, v);
  for (int i = 0; i < 4; ++i) _mm256_storeu_ps(dst + 8 * i, v[i]);
#else
  for (int k = 0; k < kGroup; ++k) dst[k] = lut[group_code(col, stride, bits, k)];
#endif
}

// Rows [n0, n1) of the dense weight into w (row stride ldw): LUT entry plus sparse residual, fp32.
void dequantize_rows(const at::Tensor& qweight, const at::Tensor& lut, int bits, int64_t in_features,
                     const Sparse& sp, int64_t n0, int64_t n1, float* w, int64_t ldw) {
  const int64_t out = qweight.size(1), groups = qweight.size(0) / bits;
  const int32_t* q = qweight.data_ptr<int32_t>();
  std::atomic<bool> bad{false};
  constexpr int64_t kRowsPerChunk = 64;
  parallel_chunks((n1 - n0 + kRowsPerChunk - 1) / kRowsPerChunk, [&](int64_t chunk) {
    const int64_t a = n0 + chunk * kRowsPerChunk, b = std::min(n1, a + kRowsPerChunk);
    Scratch luts((b - a) * 16);
    alignas(32) float group[kGroup];
    fill_luts(lut, bits, a, b, luts.get());
    // Group by group, so qweight is read row after row (contiguous runs), as in lut_matvec.
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t k0 = g * kGroup, take = std::min<int64_t>(kGroup, in_features - k0);
      for (int64_t n = a; n < b; ++n) {
        float* dst = w + (n - n0) * ldw + k0;
        decode_to(q + g * bits * out + n, out, bits, luts.get() + (n - a) * 16, take == kGroup ? dst : group);
        if (take < kGroup) std::memcpy(dst, group, sizeof(float) * take);
      }
    }
    for (int64_t n = a; n < b; ++n) {
      float* row = w + (n - n0) * ldw;
      if (sp.nnz) {
        const auto [begin, end] = csr_range(sp, n, bad);
        for (int64_t i = begin; i < end; ++i) {
          const int64_t k = sp.cols[i];
          if (k < 0 || k >= in_features) { bad = true; continue; }
          row[k] += sp.vals[i];
        }
      }
    }
  });
  TORCH_CHECK(!bad, "the sparse residual's CSR indices are out of range: the weights are corrupt");
}

at::Tensor dequantize_cpu(const at::Tensor& qweight, const at::Tensor& lut, int64_t bits, int64_t in_features,
                          const c10::optional<at::Tensor>& sparse_rows, const c10::optional<at::Tensor>& sparse_cols,
                          const c10::optional<at::Tensor>& sparse_vals) {
  const Weights w = prepare(qweight, lut, bits, in_features, sparse_rows, sparse_cols, sparse_vals);
  const int64_t out = qweight.size(1);
  at::Tensor dense = at::empty({out, in_features}, qweight.options().dtype(at::kFloat));
  dequantize_rows(w.qweight, w.lut, static_cast<int>(bits), in_features, w.sparse, 0, out, dense.data_ptr<float>(),
                  in_features);
  return dense;
}

// Prefill: dequantize tiles of output rows (at most ~4 MB of fp32 each) and multiply with BLAS.
void lut_gemm(const at::Tensor& x2d, const at::Tensor& qweight, const at::Tensor& lut, int bits,
              int64_t in_features, const Sparse& sp, const c10::optional<at::Tensor>& bias, at::Tensor& y) {
  const int64_t out = qweight.size(1);
  const int64_t tile = std::min<int64_t>(out, std::max<int64_t>(64, (int64_t{1} << 20) / in_features / 16 * 16));
  at::Tensor w = at::empty({tile, in_features}, x2d.options());
  for (int64_t n0 = 0; n0 < out; n0 += tile) {
    const int64_t n1 = std::min(out, n0 + tile);
    at::Tensor wt = w.narrow(0, 0, n1 - n0);
    dequantize_rows(qweight, lut, bits, in_features, sp, n0, n1, wt.data_ptr<float>(), in_features);
    at::Tensor part = y.narrow(1, n0, n1 - n0);
    if (bias.has_value()) {
      at::addmm_out(part, bias->reshape({-1}).narrow(0, n0, n1 - n0).to(at::kFloat), x2d, wt.t());
    } else {
      at::mm_out(part, x2d, wt.t());
    }
  }
}

// --- the op ---------------------------------------------------------------------------------------

at::Tensor lut_matmul_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& lut, int64_t bits,
                          int64_t in_features, const c10::optional<at::Tensor>& sparse_rows,
                          const c10::optional<at::Tensor>& sparse_cols, const c10::optional<at::Tensor>& sparse_vals,
                          const c10::optional<at::Tensor>& bias, int64_t max_matvec_rows) {
  const Weights w = prepare(qweight, lut, bits, in_features, sparse_rows, sparse_cols, sparse_vals);
  TORCH_CHECK(x.device().is_cpu() && at::isFloatingType(x.scalar_type()), "x must be a floating CPU tensor");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "x has ", x.size(-1), " features, expected ", in_features);
  const int64_t out = qweight.size(1);
  TORCH_CHECK(!bias.has_value() || bias->numel() == out, "bias must have ", out, " entries");
  const at::Tensor x2d = x.reshape({-1, in_features});
  const int64_t rows = x2d.size(0);
  at::Tensor y = at::empty({rows, out}, x.options().dtype(at::kFloat));
  if (rows > max_matvec_rows) {
    lut_gemm(x2d.to(at::kFloat).contiguous(), w.qweight, w.lut, static_cast<int>(bits), in_features, w.sparse, bias, y);
  } else if (rows > 0) {
    const at::Tensor xp = padded_input(x2d, in_features);
    const at::Tensor b32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
    for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows)
      lut_matvec(xp, w.qweight, w.lut, static_cast<int>(bits), in_features, w.sparse, b32.defined() ? b32.data_ptr<float>() : nullptr, y,
                 r0, std::min<int64_t>(kMaxRows, rows - r0));
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  return y.view(shape).to(x.scalar_type());
}

bool has_avx2() { return SQUEEZE_AVX2; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(squeeze, m) {
  m.def("lut_matmul_cpu(Tensor x, Tensor qweight, Tensor lookup_table, int bits, int in_features, "
        "Tensor? sparse_rows, Tensor? sparse_cols, Tensor? sparse_vals, Tensor? bias, "
        "int max_matvec_rows=8) -> Tensor");
  m.def("dequantize_cpu(Tensor qweight, Tensor lookup_table, int bits, int in_features, "
        "Tensor? sparse_rows, Tensor? sparse_cols, Tensor? sparse_vals) -> Tensor");
  m.def("cpu_kernel_simd() -> bool", [] { return has_avx2(); });
}

TORCH_LIBRARY_IMPL(squeeze, CPU, m) {
  m.impl("lut_matmul_cpu", &lut_matmul_cpu);
  m.impl("dequantize_cpu", &dequantize_cpu);
}
