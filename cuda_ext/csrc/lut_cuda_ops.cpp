// Torch binding of the CUDA LUT kernels: argument checks, allocation and the CUDA
// implementations of the ops that cuda_ext/ops.py defines (schemas and fake kernels live there,
// so the ops exist, and trace under torch.compile, even where this library was never built).
//
// Only generic c10 headers are used (the current stream comes from the device-guard interface),
// so this file compiles against any torch, CPU wheels included; CUDA itself is reached only
// through the launchers of lut_cuda.h.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>

#include "lut_cuda.h"

namespace squeeze_cuda {
namespace {

using OptionalTensor = std::optional<at::Tensor>;

// Error messages are built as one std::string, numbers and shapes with std::to_string: on the
// H200 machine's toolchain (torch 2.11+cu130, issue 19) streaming an integer into the message's
// ostream inside this library crashed the process (SIGSEGV in std::ostream::_M_insert<long>,
// read from cuda-gdb's backtrace) where a clear error was due; strings stream safely.
std::string num(int64_t value) { return std::to_string(value); }

std::string shape(at::IntArrayRef sizes) {
  std::string text = "[";
  for (size_t i = 0; i < sizes.size(); ++i) text += (i ? ", " : "") + std::to_string(sizes[i]);
  return text + "]";
}

std::string dtype_name(at::ScalarType type) { return c10::toString(type); }

int dtype_code(at::ScalarType type, const char* what) {
  switch (type) {
    case at::kFloat:
      return kFloat32;
    case at::kHalf:
      return kFloat16;
    case at::kBFloat16:
      return kBFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, std::string(what) + " must be float32, float16 or bfloat16, got " + dtype_name(type));
  return kFloat32;  // not reached
}

void* current_stream(const at::Tensor& on) {
  const c10::impl::VirtualGuardImpl guard_impl(c10::DeviceType::CUDA);
  return guard_impl.getStream(on.device()).native_handle();
}

void check_launch(int status, const char* kernel) {
  TORCH_CHECK(status == 0, std::string("squeeze_cuda: launching ") + kernel + " failed: " + error_string(status));
}

// The same words as the CPU kernel (cpu_lut.cpp) and the torch reference (core/kernels.py).
constexpr const char* kBadSparseIndex = "the sparse residual's CSR indices are out of range: the weights are corrupt";

// A zeroed device int32 the CSR kernels set when they meet a column index out of range.
at::Tensor bad_index_flag(const at::Tensor& like) { return at::zeros({1}, like.options().dtype(at::kInt)); }

// Raises when a CSR kernel flagged a corrupt column. Reading the flag waits for the kernels, so it
// is done once per call and only for layers with a residual (dense-only layers never wait here).
// Inside a CUDA-graph capture nothing may be read back: the kernels still skip a corrupt column
// (no access out of bounds), and the eager call that precedes any capture has raised already.
void check_bad_index(const at::Tensor& flag, void* stream) {
  if (stream_is_capturing(stream)) return;
  TORCH_CHECK(flag.item<int32_t>() == 0, std::string(kBadSparseIndex));
}

void check_on_device(const at::Tensor& t, const at::Tensor& like, const char* what) {
  TORCH_CHECK(t.device() == like.device(), std::string(what) + " is on " + t.device().str() +
                                             " but the activations are on " + like.device().str());
}

// Checks qweight [ceil(in/32)*bits, out] int32 and lookup_table [out, 2**bits]; returns out.
int64_t check_packed(const at::Tensor& qweight, const at::Tensor& lut, int64_t bits, int64_t in_features) {
  TORCH_CHECK(bits >= 2 && bits <= 4, "squeeze_cuda kernels take 2, 3 or 4-bit codes, got " + num(bits));
  TORCH_CHECK(in_features > 0 && in_features <= INT32_MAX, "in_features out of range: " + num(in_features));
  const int64_t groups = (in_features + kGroupSize - 1) / kGroupSize;
  TORCH_CHECK(groups <= kMaxGridY * kDequantGroupsPerBlock,
              "in_features " + num(in_features) + " is larger than the kernels' grid allows");
  TORCH_CHECK(qweight.is_cuda() && qweight.scalar_type() == at::kInt && qweight.dim() == 2 &&
                  qweight.size(0) == groups * bits,
              "qweight must be a CUDA int32 [" + num(groups * bits) + ", out] tensor for " + num(in_features) + " " +
                  num(bits) + "-bit inputs, got " + dtype_name(qweight.scalar_type()) + " " + shape(qweight.sizes()) +
                  " on " + qweight.device().str());
  const int64_t out_features = qweight.size(1);
  TORCH_CHECK(out_features <= INT32_MAX, "out_features out of range: " + num(out_features));
  TORCH_CHECK(lut.dim() == 2 && lut.size(0) == out_features && lut.size(1) == (int64_t{1} << bits),
              "lookup_table must be [" + num(out_features) + ", " + num(int64_t{1} << bits) + "], got " +
                  shape(lut.sizes()));
  check_on_device(lut, qweight, "lookup_table");
  return out_features;
}

struct Residual {
  at::Tensor rows, cols, vals;
  int64_t nnz = 0;
};

// The CSR residual (all three parts or none), checked and made contiguous.
Residual check_residual(const OptionalTensor& rows, const OptionalTensor& cols, const OptionalTensor& vals,
                        int64_t out_features, const at::Tensor& like) {
  Residual residual;
  const bool any = rows.has_value() || cols.has_value() || vals.has_value();
  if (!any) return residual;
  TORCH_CHECK(rows.has_value() && cols.has_value() && vals.has_value(),
              std::string("sparse_rows, sparse_cols and sparse_vals must be given together"));
  TORCH_CHECK(rows->scalar_type() == at::kInt && rows->dim() == 1 && rows->numel() == out_features + 1,
              "sparse_rows must be int32 [" + num(out_features + 1) + "], got " + dtype_name(rows->scalar_type()) +
                  " " + shape(rows->sizes()));
  TORCH_CHECK(cols->scalar_type() == at::kInt && vals->scalar_type() == at::kFloat && cols->dim() == 1 &&
                  vals->dim() == 1 && cols->numel() == vals->numel(),
              "sparse_cols must be int32 [nnz] and sparse_vals float32 [nnz], got " +
                  dtype_name(cols->scalar_type()) + " " + shape(cols->sizes()) + " and " +
                  dtype_name(vals->scalar_type()) + " " + shape(vals->sizes()));
  check_on_device(*rows, like, "sparse_rows");
  check_on_device(*cols, like, "sparse_cols");
  check_on_device(*vals, like, "sparse_vals");
  residual.rows = rows->contiguous();
  residual.cols = cols->contiguous();
  residual.vals = vals->contiguous();
  residual.nnz = vals->numel();
  return residual;
}

// Which mat-vec serves `rows` rows: the one-kernel path (lut_gemv_fused.cu) for a single row, the
// split-K kernels for more. SQUEEZE_CUDA_GEMV=v1 uses the split-K kernels for every row count and
// =fused-all the one-kernel path up to 8 rows (both for comparing them: bench/kernels.py). The
// split-K kernels also serve the shapes the fused kernel does not take.
bool use_fused(int64_t rows) {
  const char* choice = std::getenv("SQUEEZE_CUDA_GEMV");
  if (choice == nullptr) return rows == 1;
  if (std::strcmp(choice, "v1") == 0) return false;
  if (std::strcmp(choice, "fused-all") == 0) return true;
  return rows == 1;
}

// x (contiguous, 16-byte aligned rows) [rows, in] -> [rows, out] in x's dtype, one kernel per 8 rows.
at::Tensor lut_gemv_fused(const at::Tensor& x, const at::Tensor& q, const at::Tensor& lut, int64_t bits,
                          int64_t in_features, int64_t out_features, const Residual& residual,
                          const OptionalTensor& bias) {
  const int x_dtype = dtype_code(x.scalar_type(), "x");
  const int lut_dtype = dtype_code(lut.scalar_type(), "lookup_table");
  at::Tensor bias_c;
  int bias_dtype = kFloat32;
  if (bias.has_value()) {
    const bool storable = bias->scalar_type() == at::kFloat || bias->scalar_type() == at::kHalf ||
                          bias->scalar_type() == at::kBFloat16;
    bias_c = (storable ? *bias : bias->to(at::kFloat)).contiguous();
    bias_dtype = dtype_code(bias_c.scalar_type(), "bias");
  }
  const int64_t rows = x.size(0);
  at::Tensor y = at::empty({rows, out_features}, x.options());
  void* stream = current_stream(x);
  const at::Tensor bad = residual.nnz > 0 ? bad_index_flag(x) : at::Tensor();
  const int64_t x_row_bytes = in_features * static_cast<int64_t>(x.element_size());
  const int64_t y_row_bytes = out_features * static_cast<int64_t>(y.element_size());
  for (int64_t first = 0; first < rows; first += kMaxGemvRows) {
    const int chunk = static_cast<int>(std::min<int64_t>(kMaxGemvRows, rows - first));
    check_launch(
        launch_lut_gemv_fused(static_cast<const char*>(x.data_ptr()) + first * x_row_bytes, x_dtype, chunk,
                              static_cast<int>(in_features), q.data_ptr<int32_t>(), static_cast<int>(out_features),
                              static_cast<int>(bits), lut.data_ptr(), lut_dtype,
                              residual.nnz > 0 ? residual.rows.data_ptr<int32_t>() : nullptr,
                              residual.nnz > 0 ? residual.cols.data_ptr<int32_t>() : nullptr,
                              residual.nnz > 0 ? residual.vals.data_ptr<float>() : nullptr,
                              bias.has_value() ? bias_c.data_ptr() : nullptr, bias_dtype,
                              static_cast<char*>(y.data_ptr()) + first * y_row_bytes,
                              residual.nnz > 0 ? bad.data_ptr<int32_t>() : nullptr, stream),
        "lut_gemv_fused");
  }
  if (residual.nnz > 0) check_bad_index(bad, stream);
  return y;
}

// x [rows, in] -> [rows, out] in x's dtype: LUT mat-vec plus residual plus bias, summed in float32.
at::Tensor lut_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& lookup_table, int64_t bits,
                    int64_t in_features, const OptionalTensor& sparse_rows, const OptionalTensor& sparse_cols,
                    const OptionalTensor& sparse_vals, const OptionalTensor& bias) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features,
              "x must be [rows, " + num(in_features) + "], got " + shape(x.sizes()));
  const int64_t out_features = check_packed(qweight, lookup_table, bits, in_features);
  check_on_device(qweight, x, "qweight");
  const int x_dtype = dtype_code(x.scalar_type(), "x");
  const int lut_dtype = dtype_code(lookup_table.scalar_type(), "lookup_table");
  const Residual residual = check_residual(sparse_rows, sparse_cols, sparse_vals, out_features, x);
  const c10::DeviceGuard device_guard(x.device());

  const at::Tensor xc = x.contiguous();
  const at::Tensor q = qweight.contiguous();
  const at::Tensor lut = lookup_table.contiguous();
  const int64_t rows = x.size(0);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == out_features,
                "bias must be [" + num(out_features) + "], got " + shape(bias->sizes()));
    check_on_device(*bias, x, "bias");
  }
  // One row (decode) takes the one-kernel mat-vec; 2..7 rows the split-K kernels, which measured
  // faster there once a CSR residual is present (BENCHMARKS.md, "CUDA kernels": the fused kernel's
  // per-row residual sums meet in shared-memory atomics that serialize within a warp).
  if (use_fused(rows) && fused_gemv_supported(xc.data_ptr(), x_dtype, static_cast<int>(in_features))) {
    return lut_gemv_fused(xc, q, lut, bits, in_features, out_features, residual, bias);
  }
  // Partial sums of the split-K blocks are added atomically, so y starts as the bias (or zero).
  // A fresh buffer always: the kernels add into it, and the bias itself must stay untouched.
  at::Tensor y = at::empty({rows, out_features}, x.options().dtype(at::kFloat));
  if (bias.has_value()) {
    y.copy_(bias->unsqueeze(0).expand({rows, out_features}));
  } else {
    y.zero_();
  }
  void* stream = current_stream(x);
  const at::Tensor bad = residual.nnz > 0 ? bad_index_flag(x) : at::Tensor();
  const int64_t row_bytes = in_features * static_cast<int64_t>(xc.element_size());
  for (int64_t first = 0; first < rows; first += kMaxGemvRows) {
    const int chunk = static_cast<int>(std::min<int64_t>(kMaxGemvRows, rows - first));
    const void* x_chunk = static_cast<const char*>(xc.data_ptr()) + first * row_bytes;
    float* y_chunk = y.data_ptr<float>() + first * out_features;
    check_launch(launch_lut_gemv(x_chunk, x_dtype, chunk, static_cast<int>(in_features), q.data_ptr<int32_t>(),
                                 static_cast<int>(out_features), static_cast<int>(bits), lut.data_ptr(), lut_dtype,
                                 y_chunk, stream),
                 "lut_gemv");
    if (residual.nnz > 0) {
      check_launch(launch_csr_gemv(x_chunk, x_dtype, chunk, static_cast<int>(in_features),
                                   residual.rows.data_ptr<int32_t>(), residual.cols.data_ptr<int32_t>(),
                                   residual.vals.data_ptr<float>(), residual.nnz, static_cast<int>(out_features),
                                   y_chunk, bad.data_ptr<int32_t>(), stream),
                   "csr_gemv");
    }
  }
  if (residual.nnz > 0) check_bad_index(bad, stream);
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// The effective weight, transposed: [in_features, out] in `dtype` (dense LUT part plus residual).
at::Tensor lut_dequantize(const at::Tensor& qweight, const at::Tensor& lookup_table, int64_t bits,
                          int64_t in_features, const OptionalTensor& sparse_rows, const OptionalTensor& sparse_cols,
                          const OptionalTensor& sparse_vals, at::ScalarType dtype) {
  const int64_t out_features = check_packed(qweight, lookup_table, bits, in_features);
  const int out_dtype = dtype_code(dtype, "dtype");
  const int lut_dtype = dtype_code(lookup_table.scalar_type(), "lookup_table");
  const Residual residual = check_residual(sparse_rows, sparse_cols, sparse_vals, out_features, qweight);
  const c10::DeviceGuard device_guard(qweight.device());

  const at::Tensor q = qweight.contiguous();
  const at::Tensor lut = lookup_table.contiguous();
  at::Tensor weight_t = at::empty({in_features, out_features}, qweight.options().dtype(dtype));
  void* stream = current_stream(qweight);
  check_launch(launch_lut_dequantize(q.data_ptr<int32_t>(), static_cast<int>(in_features),
                                     static_cast<int>(out_features), static_cast<int>(bits), lut.data_ptr(),
                                     lut_dtype, weight_t.data_ptr(), out_dtype, stream),
               "lut_dequantize");
  if (residual.nnz > 0) {
    const at::Tensor bad = bad_index_flag(qweight);
    check_launch(launch_csr_scatter_add(residual.rows.data_ptr<int32_t>(), residual.cols.data_ptr<int32_t>(),
                                        residual.vals.data_ptr<float>(), residual.nnz,
                                        static_cast<int>(in_features), static_cast<int>(out_features),
                                        weight_t.data_ptr(), out_dtype, bad.data_ptr<int32_t>(), stream),
                 "csr_scatter_add");
    check_bad_index(bad, stream);
  }
  return weight_t;
}

}  // namespace
}  // namespace squeeze_cuda

TORCH_LIBRARY_IMPL(squeeze_cuda, CUDA, m) {
  m.impl("lut_gemv", &squeeze_cuda::lut_gemv);
  m.impl("lut_dequantize", &squeeze_cuda::lut_dequantize);
}
