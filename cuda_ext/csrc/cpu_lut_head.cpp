// The fp16-weight linear of the output head (lm_head, often tied to the token embedding):
// y = x @ W^T + bias with W float16 [out, in], computed in float32.
//
// The head is the largest matrix of a small model (49152 x 576 for the demo model) and stays
// unquantized, so at batch 1 its weight traffic rivals all quantized layers together. Stored in
// fp16 it is half the bytes of fp32: the mat-vec converts 8 weights at a time with F16C while
// streaming the rows. More rows (prefill, evaluation): tiles of rows are converted to fp32 and
// multiplied by the BLAS GEMM, like the LUT kernel's prefill path.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "cpu_lut_threads.h"

namespace {

using namespace squeeze_cpu;

constexpr int64_t kHeadRowsPerChunk = 256;  // output rows per claimed chunk (~300 KB of fp16 at in=576)

#if SQUEEZE_AVX2
// y[r, n] for NB consecutive output rows n and R input rows: NB*R independent FMA chains.
template <int R, int NB>
inline void rows_dot(const uint16_t* w, int64_t in, const float* x, int64_t ldx, float* out /* [NB][R] */) {
  __m256 acc[NB][R];
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < R; ++r) acc[b][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= in; k += 8) {
    __m256 xv[R];
    for (int r = 0; r < R; ++r) xv[r] = _mm256_loadu_ps(x + r * ldx + k);
    for (int b = 0; b < NB; ++b) {
      const __m256 wv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + b * in + k)));
      for (int r = 0; r < R; ++r) acc[b][r] = _mm256_fmadd_ps(wv, xv[r], acc[b][r]);
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < R; ++r) {
      float s = hsum(acc[b][r]);
      for (int64_t j = k; j < in; ++j)
        s += static_cast<float>(c10::Half(w[b * in + j], c10::Half::from_bits())) * x[r * ldx + j];
      out[b * R + r] = s;
    }
}

// Output rows [n0, n1) for R input rows, 4 rows at a time when R <= 2 (enough chains to hide the
// FMA latency), 2 when R <= 4, else 1 (keeps the accumulators in registers).
template <int R>
void head_rows(const uint16_t* w, int64_t in, const float* x, int64_t ldx, int64_t n0, int64_t n1, float* y,
               int64_t ldy) {
  constexpr int NB = R <= 2 ? 4 : (R <= 4 ? 2 : 1);
  float part[NB * R];
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) {
    rows_dot<R, NB>(w + n * in, in, x, ldx, part);
    for (int b = 0; b < NB; ++b)
      for (int r = 0; r < R; ++r) y[r * ldy + n + b] = part[b * R + r];
  }
  for (; n < n1; ++n) {
    rows_dot<R, 1>(w + n * in, in, x, ldx, part);
    for (int r = 0; r < R; ++r) y[r * ldy + n] = part[r];
  }
}
#endif

void head_rows_any(const uint16_t* w, int64_t in, const float* x, int64_t ldx, int rows, int64_t n0, int64_t n1,
                   float* y, int64_t ldy) {
#if SQUEEZE_AVX2
  switch (rows) {
    case 1: return head_rows<1>(w, in, x, ldx, n0, n1, y, ldy);
    case 2: return head_rows<2>(w, in, x, ldx, n0, n1, y, ldy);
    case 3: return head_rows<3>(w, in, x, ldx, n0, n1, y, ldy);
    case 4: return head_rows<4>(w, in, x, ldx, n0, n1, y, ldy);
    case 5: return head_rows<5>(w, in, x, ldx, n0, n1, y, ldy);
    case 6: return head_rows<6>(w, in, x, ldx, n0, n1, y, ldy);
    case 7: return head_rows<7>(w, in, x, ldx, n0, n1, y, ldy);
    default: return head_rows<8>(w, in, x, ldx, n0, n1, y, ldy);
  }
#else
  for (int64_t n = n0; n < n1; ++n)
    for (int r = 0; r < rows; ++r) {
      float s = 0.f;
      for (int64_t k = 0; k < in; ++k)
        s += static_cast<float>(c10::Half(w[n * in + k], c10::Half::from_bits())) * x[r * ldx + k];
      y[r * ldy + n] = s;
    }
#endif
}

// y [rows, out] (fp32) = x [rows, in] (fp32, contiguous) @ W^T, rows <= kMaxRows at a time.
void head_matvec(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y) {
  const int64_t rows = x.size(0), in = x.size(1), out = weight.size(0);
  const auto* w = static_cast<const uint16_t*>(weight.const_data_ptr());
  const float* xp = x.const_data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
    const int take = static_cast<int>(std::min<int64_t>(kMaxRows, rows - r0));
    parallel_chunks((out + kHeadRowsPerChunk - 1) / kHeadRowsPerChunk, [&](int64_t chunk) {
      const int64_t n0 = chunk * kHeadRowsPerChunk, n1 = std::min(out, n0 + kHeadRowsPerChunk);
      head_rows_any(w, in, xp + r0 * in, in, take, n0, n1, yp + r0 * out, out);
    });
  }
}

// Prefill: fp32 tiles of at most ~4 MB of the weight, one BLAS GEMM each.
void head_gemm(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y) {
  const int64_t in = x.size(1), out = weight.size(0);
  const int64_t tile = std::min<int64_t>(out, std::max<int64_t>(64, (int64_t{1} << 20) / in / 16 * 16));
  at::Tensor w32 = at::empty({tile, in}, x.options());
  for (int64_t n0 = 0; n0 < out; n0 += tile) {
    const int64_t n1 = std::min(out, n0 + tile);
    at::Tensor wt = w32.narrow(0, 0, n1 - n0);
    wt.copy_(weight.narrow(0, n0, n1 - n0));
    at::Tensor part = y.narrow(1, n0, n1 - n0);
    at::mm_out(part, x, wt.t());
  }
}

at::Tensor half_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           int64_t max_matvec_rows) {
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kHalf && weight.dim() == 2,
              "weight must be a float16 CPU tensor [out, in]");
  TORCH_CHECK(x.device().is_cpu() && at::isFloatingType(x.scalar_type()), "x must be a floating CPU tensor");
  const int64_t in = weight.size(1), out = weight.size(0);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in, "x has ", x.size(-1), " features, expected ", in);
  TORCH_CHECK(!bias.has_value() || bias->numel() == out, "bias must have ", out, " entries");
  const at::Tensor w = weight.contiguous();
  const at::Tensor x2d = x.reshape({-1, in}).to(at::kFloat).contiguous();
  at::Tensor y = at::empty({x2d.size(0), out}, x.options().dtype(at::kFloat));
  if (x2d.size(0) > max_matvec_rows) {
    head_gemm(x2d, w, y);
  } else if (x2d.size(0) > 0) {
    head_matvec(x2d, w, y);
  }
  if (bias.has_value()) y.add_(bias->reshape({-1}).to(at::kFloat));
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  return y.view(shape).to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(squeeze, m) {
  m.def("half_linear_cpu(Tensor x, Tensor weight, Tensor? bias, int max_matvec_rows=8) -> Tensor");
}

TORCH_LIBRARY_IMPL(squeeze, CPU, m) { m.impl("half_linear_cpu", &half_linear_cpu); }
