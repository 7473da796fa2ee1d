"""The CUDA kernel sources compile, and their decoding logic is right, on a machine without a GPU.

* every ``cuda_ext/csrc/*.cu`` compiles with nvcc to an object file for sm_80 and sm_90
  (the .cu files need only the CUDA headers; torch's include paths are passed as well);
* the torch binding ``lut_cuda_ops.cpp`` compiles with g++ against torch's headers (it uses no
  c10/cuda header, so a CPU-only torch wheel is enough) and links, with stub launchers, into a
  library that loads and registers CUDA kernels for the ops ``cuda_ext.ops`` defines (so the
  C++ signatures match the schemas);
* ``lut_decode.cuh`` (the bit decoding and per-group multiply-accumulate the kernels run) is
  built for the host with g++ and compared with ``core.packing`` / ``core.kernels``.

The compilers run in parallel in one module fixture (about 30-60 s of CPU on 2 cores).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from core.kernels import lut_matmul as reference_lut_matmul
from core.packing import pack_codes

CSRC = Path(__file__).resolve().parents[2] / "cuda_ext" / "csrc"
CU_SOURCES = sorted(CSRC.glob("*.cu"))
ARCHS = ("80", "90")
NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")

_HOST_SHIM = r"""
#include "lut_decode.cuh"
using namespace squeeze_cuda;

template <int BITS, int ROWS>
static void gemv(const int32_t* qweight, int in_features, int out_features, const float* lut, const float* x,
                 float* y) {
  const int groups = (in_features + 31) / 32;
  for (int n = 0; n < out_features; ++n) {
    float acc[ROWS] = {};
    for (int g = 0; g < groups; ++g) {
      uint32_t words[BITS];
      for (int j = 0; j < BITS; ++j) words[j] = static_cast<uint32_t>(qweight[(g * BITS + j) * out_features + n]);
      float xs[ROWS * 32];  // as the kernel stages them: zeros past in_features
      for (int b = 0; b < ROWS; ++b)
        for (int k = 0; k < 32; ++k) xs[b * 32 + k] = g * 32 + k < in_features ? x[b * in_features + g * 32 + k] : 0.f;
      accumulate_group<BITS, ROWS>(words, lut + n * (1 << BITS), 1, xs, 32, acc);
    }
    for (int b = 0; b < ROWS; ++b) y[b * out_features + n] = acc[b];
  }
}

template <int BITS>
static int gemv_rows(int rows, const int32_t* q, int in, int out, const float* lut, const float* x, float* y) {
  switch (rows) {
    case 1: gemv<BITS, 1>(q, in, out, lut, x, y); return 0;
    case 2: gemv<BITS, 2>(q, in, out, lut, x, y); return 0;
    case 3: gemv<BITS, 3>(q, in, out, lut, x, y); return 0;
    case 8: gemv<BITS, 8>(q, in, out, lut, x, y); return 0;
    default: return 1;
  }
}

extern "C" int sqz_gemv(int bits, int rows, const int32_t* q, int in, int out, const float* lut, const float* x,
                        float* y) {
  switch (bits) {
    case 2: return gemv_rows<2>(rows, q, in, out, lut, x, y);
    case 3: return gemv_rows<3>(rows, q, in, out, lut, x, y);
    case 4: return gemv_rows<4>(rows, q, in, out, lut, x, y);
    default: return 1;
  }
}

extern "C" unsigned sqz_code(int bits, const uint32_t* words, int k) {
  switch (bits) {
    case 2: return stream_code<2>(words, k);
    case 3: return stream_code<3>(words, k);
    default: return stream_code<4>(words, k);
  }
}
"""


# Launchers that do nothing: enough to link the binding and check its op registration.
_LAUNCHER_STUBS = r"""
#include "lut_cuda.h"
namespace squeeze_cuda {
int launch_lut_gemv(const void*, int, int, int, const int32_t*, int, int, const void*, int, float*, void*) { return 0; }
int launch_csr_gemv(const void*, int, int, int, const int32_t*, const int32_t*, const float*, int64_t, int, float*,
                    int32_t*, void*) { return 0; }
int launch_lut_dequantize(const int32_t*, int, int, int, const void*, int, void*, int, void*) { return 0; }
int launch_csr_scatter_add(const int32_t*, const int32_t*, const float*, int64_t, int, int, void*, int, int32_t*,
                           void*) {
  return 0;
}
const char* error_string(int) { return "stub"; }
bool stream_is_capturing(void*) { return false; }
bool fused_gemv_supported(const void*, int, int) { return false; }
int launch_lut_gemv_fused(const void*, int, int, int, const int32_t*, int, int, const void*, int, const int32_t*,
                          const int32_t*, const float*, const void*, int, void*, int32_t*, void*) {
  return 0;
}
}  // namespace squeeze_cuda
"""

_LOAD_CHECK = """
import sys, torch
import cuda_ext.ops  # defines the schemas
torch.ops.load_library(sys.argv[1])
for op in ("lut_gemv", "lut_dequantize"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"squeeze_cuda::{op}", "CUDA"), op
print("registered")
"""


def _torch_include_flags() -> list[str]:
    from torch.utils import cpp_extension

    try:
        paths = cpp_extension.include_paths(device_type="cuda")
    except Exception:  # CPU wheels without CUDA_HOME: the plain torch include folders do
        paths = cpp_extension.include_paths()
    return [f"-I{p}" for p in paths]


def _run(command: list[str]) -> tuple[int, str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    return done.returncode, (done.stdout + done.stderr)[-4000:]


def _nvcc_command(source: Path, out_dir: Path) -> list[str]:
    """nvcc as torch's JIT build calls it (its half/bfloat16 no-conversion defines included)."""
    from torch.utils import cpp_extension

    torch_flags = list(getattr(cpp_extension, "COMMON_NVCC_FLAGS", []))
    gencode = [flag for arch in ARCHS for flag in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]
    return [NVCC, "-c", str(source), "-o", str(out_dir / f"{source.stem}.o"), "-std=c++17", "-O3",
            "-Xcompiler", "-fPIC", *torch_flags, f"-I{CSRC}", *_torch_include_flags(), *gencode]


def _binding_command(stubs: Path, library: Path) -> list[str]:
    """g++ building the binding (-O0: this checks compiling and linking, not speed) with the stubs."""
    from torch.utils import cpp_extension

    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    link = [f"-L{p}" for p in cpp_extension.library_paths()] + ["-lc10", "-ltorch_cpu", "-ltorch"]
    return [GXX, "-shared", "-fPIC", "-O0", "-std=c++20", abi, f"-I{CSRC}", *_torch_include_flags(),
            str(CSRC / "lut_cuda_ops.cpp"), str(stubs), *link, "-o", str(library)]


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, tuple[int, str]]:
    """name -> (return code, compiler output tail) of every compile, run in parallel."""
    out_dir = tmp_path_factory.mktemp("cuda_objects")
    jobs: dict[str, list[str]] = {}
    if NVCC:
        jobs.update({source.name: _nvcc_command(source, out_dir) for source in CU_SOURCES})
    if GXX:
        stubs = out_dir / "launcher_stubs.cpp"
        stubs.write_text(_LAUNCHER_STUBS)
        jobs["lut_cuda_ops.cpp"] = _binding_command(stubs, out_dir / "binding_with_stubs.so")
        shim = out_dir / "host_shim.cpp"
        shim.write_text(_HOST_SHIM)
        jobs["host_shim"] = [GXX, "-O1", "-std=c++17", "-shared", "-fPIC", f"-I{CSRC}", str(shim),
                             "-o", str(out_dir / "host_shim.so")]
    with ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
        results = dict(zip(jobs, pool.map(_run, jobs.values())))
    results["_dir"] = (0, str(out_dir))
    return results


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed: the CUDA sources cannot be compiled here")
@pytest.mark.parametrize("source", [s.name for s in CU_SOURCES])
def test_cu_source_compiles_for_sm80_and_sm90(builds, source):
    code, output = builds[source]
    assert code == 0, f"nvcc failed on {source}:\n{output}"
    assert (Path(builds["_dir"][1]) / source.replace(".cu", ".o")).stat().st_size > 0


def test_cuda_sources_exist():
    assert {s.name for s in CU_SOURCES} >= {"lut_gemv.cu", "lut_dequant.cu"}


@pytest.mark.skipif(GXX is None, reason="g++ is not installed")
def test_torch_binding_compiles_links_and_registers_the_ops(builds):
    code, output = builds["lut_cuda_ops.cpp"]
    assert code == 0, f"g++ failed on lut_cuda_ops.cpp:\n{output}"
    library = Path(builds["_dir"][1]) / "binding_with_stubs.so"
    # A separate process: the stub kernels must never be registered where real ones may load.
    done = subprocess.run([sys.executable, "-c", _LOAD_CHECK, str(library)], capture_output=True, text=True,
                          timeout=300, cwd=CSRC.parents[1])
    assert done.returncode == 0 and "registered" in done.stdout, done.stderr[-3000:]


@pytest.fixture(scope="module")
def host_shim(builds):
    if GXX is None:
        pytest.skip("g++ is not installed")
    code, output = builds["host_shim"]
    assert code == 0, f"the host build of lut_decode.cuh failed:\n{output}"
    return ctypes.CDLL(str(Path(builds["_dir"][1]) / "host_shim.so"))


def _ptr(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_decoder_reads_every_code_of_a_group_as_packed(host_shim, bits):
    """All 32 codes of a group, including 3-bit codes 10 and 21 that straddle two words."""
    torch.manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (1, 32), dtype=torch.uint8)
    words = pack_codes(codes, bits)[:, 0].contiguous()  # int32 [bits]
    decoded = [host_shim.sqz_code(bits, _ptr(words), k) for k in range(32)]
    assert decoded == codes[0].tolist()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize(("out_features", "in_features", "rows"),
                         [(7, 33, 1), (1, 7, 3), (192, 576, 8), (33, 64, 2)])
def test_group_accumulation_matches_the_torch_reference(host_shim, bits, out_features, in_features, rows):
    """The mat-vec's inner loop (decode, LUT lookup, multiply-accumulate of all rows) on the host."""
    generator = torch.Generator().manual_seed(out_features * in_features + bits)
    codes = torch.randint(0, 1 << bits, (out_features, in_features), dtype=torch.uint8, generator=generator)
    qweight = pack_codes(codes, bits)
    lut = torch.randn(out_features, 1 << bits, generator=generator)
    x = torch.randn(rows, in_features, generator=generator)
    y = torch.empty(rows, out_features)
    status = host_shim.sqz_gemv(bits, rows, _ptr(qweight), in_features, out_features, _ptr(lut), _ptr(x), _ptr(y))
    assert status == 0
    expected = reference_lut_matmul(x, qweight, lut, bits, in_features)
    # Both sum in float32, in different orders: allow float32 rounding over in_features terms.
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6 * in_features)
