// CPU kernels for SqueezeLinear: y = x @ (LUT[codes] + S)^T + bias, reading the packed codes directly.
//
// Few input rows (decode): the LUT mat-vec of cpu_lut_decode.h over the packed codes, so the only
// memory traffic is the codes (the bottleneck at batch 1), the input and the CSR residual. More
// rows (prefill): dequantize a tile of output rows to fp32 and hand it to the BLAS GEMM.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "cpu_lut_decode.h"
#include "cpu_lut_fp16.h"
#include "cpu_lut_threads.h"

namespace {

using namespace squeeze_cpu;

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
  TORCH_CHECK(bits >= 2 && bits <= 8 && bits != 7, "bits must be 2, 3, 4, 5, 6 or 8, got ",
              bits);
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

// --- mat-vec path (few rows) --------------------------------------------------------------------

// Columns per chunk of work: at most 128 (64 above 2 rows; 32 for the 32- to 256-entry tables of 5 to 8
// bits), so their partial sums (8 floats per row and column) and LUTs stay in L1, and as many
// chunks as a multiple of the thread count, so no thread waits for another's extra chunk (192 columns
// on 2 threads: 2 x 96, not 128 + 64), in multiples of 8 (the 4-bit byte path's unit).
inline int64_t tile_width(int64_t rows, int64_t out, int bits) {
  const int64_t widest = bits > 4 ? 32 : rows <= 2 ? 128 : 64, threads = std::max(1, at::get_num_threads());
  const int64_t chunks = ((out + widest - 1) / widest + threads - 1) / threads * threads;
  return std::max<int64_t>(8, ((out + chunks - 1) / chunks + 7) / 8 * 8);
}

// One layer of a mat-vec call: its checked weights, fp32 bias (or null) and fp32 output [rows, out].
struct MatvecLayer {
  Weights w;
  int bits = 0;
  const float* bias = nullptr;
  float* y = nullptr;
  int64_t out = 0, width = 0, chunks = 0;
  bool bytes_path = false;  // 4-bit codes with an fp16 LUT: the byte-shuffle kernel (cpu_lut_fp16.h)
};

// Columns [t0, t1) of one layer for input rows [row0, row0 + rows): y = decoded . x + sparse . x + bias.
void matvec_chunk(const MatvecLayer& L, int64_t chunk, const float* x, const float* xperm, int64_t ldx,
                  int64_t in_features, int64_t row0, int64_t rows, std::atomic<bool>& bad) {
  const int64_t t0 = chunk * L.width, t1 = std::min(L.out, t0 + L.width), groups = L.w.qweight.size(0) / L.bits;
  const int32_t* q = L.w.qweight.data_ptr<int32_t>();
  const Sparse& sp = L.w.sparse;
  const int64_t t8 = L.bytes_path ? t0 + (t1 - t0) / 8 * 8 : t0;  // [t0, t8) by the byte path
  Scratch luts(L.width * lut_stride(L.bits));  // fp32 LUT rows, or the byte path's tables (32 bytes per column)
  std::vector<float> dots(L.width * kMaxRows);
#if SQUEEZE_AVX2
  if (t8 > t0) {
    auto* tables = reinterpret_cast<uint8_t*>(luts.get());
    fill_pair_tables(static_cast<const uint16_t*>(L.w.lut.const_data_ptr()), t0, t8, tables);
    tile_dots_fp16x4_rows(q, L.out, groups, tables, xperm, ldx, static_cast<int>(rows), t0, t8, dots.data());
  }
#endif
  if (t1 > t8) {
    fill_luts(L.w.lut, L.bits, t8, t1, luts.get());
    tile_dots_any(q, L.out, L.bits, groups, luts.get(), x, ldx, static_cast<int>(rows), t8, t1,
                  dots.data() + (t8 - t0) * kMaxRows);
  }
  float* yp = L.y + row0 * L.out;
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
    const float b = L.bias ? L.bias[n] : 0.f;
    for (int64_t r = 0; r < rows; ++r) yp[r * L.out + n] = d[r] + b;
  }
}

// Input rows [row0, row0 + rows <= kMaxRows) of xp through every layer, in one parallel region:
// the chunks of all layers share the threads (layers that read the same input, like q/k/v, cost one
// call and one wait for the slowest thread instead of three).
void lut_matvec(const at::Tensor& xp, std::vector<MatvecLayer>& layers, int64_t in_features, int64_t row0,
                int64_t rows) {
  const int64_t ldx = xp.size(1);
  const float* x = xp.data_ptr<float>() + row0 * ldx;
  std::vector<int64_t> first_chunk{0};  // layer i owns chunks [first_chunk[i], first_chunk[i + 1])
  bool any_bytes = false;
  for (auto& L : layers) {
    L.width = tile_width(rows, L.out, L.bits);
    L.chunks = (L.out + L.width - 1) / L.width;
    first_chunk.push_back(first_chunk.back() + L.chunks);
    any_bytes |= L.bytes_path;
  }
  std::vector<float> xperm(any_bytes ? rows * ldx : 0);
#if SQUEEZE_AVX2
  if (any_bytes) permute_inputs(x, rows, ldx, xperm.data());
#endif
  std::atomic<bool> bad{false};
  parallel_chunks(first_chunk.back(), [&](int64_t chunk) {
    size_t i = 0;
    while (chunk >= first_chunk[i + 1]) ++i;
    matvec_chunk(layers[i], chunk - first_chunk[i], x, xperm.data(), ldx, in_features, row0, rows, bad);
  });
  TORCH_CHECK(!bad, "the sparse residual's CSR indices are out of range: the weights are corrupt");
}

// --- dequantize (prefill path and tests) --------------------------------------------------------

// The 32 fp32 weights of one group of one column (LUT part only).
inline void decode_to(const int32_t* col, int64_t stride, int bits, const float* lut, float* dst) {
#if SQUEEZE_AVX2
  __m256 v[4];
  if (bits == 8) decode_group<8>(col, stride, lut, v);
  else if (bits == 6) decode_group<6>(col, stride, lut, v);
  else if (bits == 5) decode_group<5>(col, stride, lut, v);
  else if (bits == 4) decode_group<4>(col, stride, lut, v);
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
    const int stride = lut_stride(bits);
    Scratch luts((b - a) * stride);
    alignas(32) float group[kGroup];
    fill_luts(lut, bits, a, b, luts.get());
    // Group by group, so qweight is read row after row (contiguous runs), as in lut_matvec.
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t k0 = g * kGroup, take = std::min<int64_t>(kGroup, in_features - k0);
      for (int64_t n = a; n < b; ++n) {
        float* dst = w + (n - n0) * ldw + k0;
        decode_to(q + g * bits * out + n, out, bits, luts.get() + (n - a) * stride, take == kGroup ? dst : group);
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

// x [..., in] through layers that all read it: one output [..., out_i] per layer, in x's dtype.
std::vector<at::Tensor> lut_matmul_many_cpu(const at::Tensor& x, at::TensorList qweights, at::TensorList luts,
                                            at::IntArrayRef bits, int64_t in_features,
                                            const c10::List<c10::optional<at::Tensor>>& sparse_rows,
                                            const c10::List<c10::optional<at::Tensor>>& sparse_cols,
                                            const c10::List<c10::optional<at::Tensor>>& sparse_vals,
                                            const c10::List<c10::optional<at::Tensor>>& biases,
                                            int64_t max_matvec_rows) {
  const size_t count = qweights.size();
  TORCH_CHECK(luts.size() == count && bits.size() == count && sparse_rows.size() == count &&
                  sparse_cols.size() == count && sparse_vals.size() == count && biases.size() == count,
              "lut_matmul_many: every weight list must have one entry per layer");
  TORCH_CHECK(x.device().is_cpu() && at::isFloatingType(x.scalar_type()), "x must be a floating CPU tensor");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "x has ", x.size(-1), " features, expected ", in_features);
  const at::Tensor x2d = x.reshape({-1, in_features});
  const int64_t rows = x2d.size(0);
  std::vector<MatvecLayer> layers(count);
  std::vector<at::Tensor> outputs(count), biases32(count);
  for (size_t i = 0; i < count; ++i) {
    MatvecLayer& L = layers[i];
    L.w = prepare(qweights[i], luts[i], bits[i], in_features, sparse_rows.get(i), sparse_cols.get(i),
                  sparse_vals.get(i));
    L.bits = static_cast<int>(bits[i]);
    L.out = qweights[i].size(1);
    const c10::optional<at::Tensor> bias = biases.get(i);
    TORCH_CHECK(!bias.has_value() || bias->numel() == L.out, "bias must have ", L.out, " entries");
    if (bias.has_value()) {
      biases32[i] = bias->to(at::kFloat).contiguous();
      L.bias = biases32[i].data_ptr<float>();
    }
    outputs[i] = at::empty({rows, L.out}, x.options().dtype(at::kFloat));
    L.y = outputs[i].data_ptr<float>();
    L.bytes_path = SQUEEZE_AVX2 && L.bits == 4 && L.w.lut.scalar_type() == at::kHalf;
  }
  if (rows > max_matvec_rows) {
    const at::Tensor x32 = x2d.to(at::kFloat).contiguous();
    for (size_t i = 0; i < count; ++i)
      lut_gemm(x32, layers[i].w.qweight, layers[i].w.lut, layers[i].bits, in_features, layers[i].w.sparse,
               biases.get(i), outputs[i]);
  } else if (rows > 0) {
    const at::Tensor xp = padded_input(x2d, in_features);
    for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows)
      lut_matvec(xp, layers, in_features, r0, std::min<int64_t>(kMaxRows, rows - r0));
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  for (size_t i = 0; i < count; ++i) {
    shape.back() = layers[i].out;
    outputs[i] = outputs[i].view(shape).to(x.scalar_type());
  }
  return outputs;
}

at::Tensor lut_matmul_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& lut, int64_t bits,
                          int64_t in_features, const c10::optional<at::Tensor>& sparse_rows,
                          const c10::optional<at::Tensor>& sparse_cols, const c10::optional<at::Tensor>& sparse_vals,
                          const c10::optional<at::Tensor>& bias, int64_t max_matvec_rows) {
  const auto one = [](const c10::optional<at::Tensor>& t) { return c10::List<c10::optional<at::Tensor>>({t}); };
  return lut_matmul_many_cpu(x, {qweight}, {lut}, {bits}, in_features, one(sparse_rows), one(sparse_cols),
                             one(sparse_vals), one(bias), max_matvec_rows)[0];
}

bool has_avx2() { return SQUEEZE_AVX2; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(squeeze, m) {
  m.def("lut_matmul_cpu(Tensor x, Tensor qweight, Tensor lookup_table, int bits, int in_features, "
        "Tensor? sparse_rows, Tensor? sparse_cols, Tensor? sparse_vals, Tensor? bias, "
        "int max_matvec_rows=8) -> Tensor");
  m.def("lut_matmul_many_cpu(Tensor x, Tensor[] qweights, Tensor[] lookup_tables, int[] bits, int in_features, "
        "Tensor?[] sparse_rows, Tensor?[] sparse_cols, Tensor?[] sparse_vals, Tensor?[] biases, "
        "int max_matvec_rows=8) -> Tensor[]");
  m.def("dequantize_cpu(Tensor qweight, Tensor lookup_table, int bits, int in_features, "
        "Tensor? sparse_rows, Tensor? sparse_cols, Tensor? sparse_vals) -> Tensor");
  m.def("cpu_kernel_simd() -> bool", [] { return has_avx2(); });
}

TORCH_LIBRARY_IMPL(squeeze, CPU, m) {
  m.impl("lut_matmul_cpu", &lut_matmul_cpu);
  m.impl("lut_matmul_many_cpu", &lut_matmul_many_cpu);
  m.impl("dequantize_cpu", &dequantize_cpu);
}
