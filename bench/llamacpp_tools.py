"""llama.cpp's command-line tools, built once from the source vendored in llama-cpp-python's sdist.

python -m bench.llamacpp_tools [--jobs N]     build (or find) the tools and print their folder

No model hub and no GitHub are reachable here, but PyPI is: the ``llama-cpp-python`` sdist carries
llama.cpp under ``vendor/llama.cpp``. ``pip download`` fetches it, cmake builds only the tools
the bench and the GGUF export test use (llama-quantize, llama-imatrix, llama-perplexity,
llama-bench, llama-tokenize; CPU, no curl), niced, into ``cache_dir()/llama.cpp/<version>-<cpu>/``:
``bin/`` holds the programs, ``src/`` the llama.cpp source (its ``convert_hf_to_gguf.py`` and
``gguf-py`` convert a transformers folder to GGUF). Built with ``GGML_NATIVE`` (this CPU's
instructions, as a desktop user's own build would be), so the cache is keyed by the CPU's flags
too. The finished folder is renamed into place: a killed build leaves nothing that looks usable.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from core.errors import UserError
from core.paths import cache_dir

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench", "llama-tokenize")
MISSING_BUILD_TOOLS = ("building llama.cpp's tools needs {what}: install it (Debian/Ubuntu: "
                       "sudo apt-get install -y cmake g++; or pip install cmake) and run again")


def tools_home(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """The cache folder for this version on this CPU (it may not be built yet)."""
    return cache_dir() / "llama.cpp" / f"{version}-{_cpu_key()}"


def tool(name: str, home: Path | None = None) -> Path:
    """The path of one built tool (``ensure_tools`` first)."""
    return (home or tools_home()) / "bin" / name


def ensure_tools(jobs: int = 2, log=print) -> Path:
    """The folder with ``bin/`` (the tools) and ``src/`` (llama.cpp), building it if needed."""
    home = tools_home()
    if all((home / "bin" / name).is_file() for name in TOOLS):
        return home
    for program, what in (("cmake", "cmake"), ("c++", "a C++ compiler (g++ or clang++)"),
                          ("cc", "a C compiler (gcc or clang)")):
        if shutil.which(program, path=_build_path()) is None:
            raise UserError(MISSING_BUILD_TOOLS.format(what=what))
    home.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{home.name}-build-", dir=home.parent))
    try:
        t0 = time.perf_counter()
        source = _fetch_source(work, log)
        _build(source, work / "build", jobs, log)
        (work / "bin").mkdir()
        for name in TOOLS:
            shutil.copy2(work / "build" / "bin" / name, work / "bin" / name)
        shutil.rmtree(work / "build")
        source.rename(work / "src")
        shutil.rmtree(work / "unpacked")
        shutil.rmtree(home, ignore_errors=True)  # a folder without every tool is incomplete
        work.chmod(0o755)  # mkdtemp made it private
        work.rename(home)
        log(f"llama.cpp tools built in {time.perf_counter() - t0:.0f} s: {home / 'bin'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return home


def perplexity(model: Path, text_file: Path, ctx: int, *, chunks: int | None = None,
               threads: int = 1, home: Path | None = None) -> tuple[float, int]:
    """(perplexity, chunks evaluated) from ``llama-perplexity`` on ``text_file`` in chunks of ``ctx``
    tokens. One thread by default: ggml's threads wait for each other by spinning, and on a machine
    whose cores are busy with other work two threads took 6x longer than one (25 s against 4 s on
    a tiny model). llama.cpp scores only the second half of each chunk (positions ctx/2 .. ctx-2 predict the
    tokens after them); ``core.evaluate`` scores every position (``second_half_perplexity`` in
    bench/llamacpp.py computes llama.cpp's way)."""
    command = [str(tool("llama-perplexity", home)), "-m", str(model), "-f", str(text_file), "-c", str(ctx),
               "-b", str(ctx), "-t", str(threads), "--no-escape"] + (["--chunks", str(chunks)] if chunks else [])
    result = subprocess.run(command, capture_output=True, text=True)
    log = result.stdout + result.stderr
    final = re.search(r"Final estimate: PPL = ([0-9.]+|nan|inf)", log)
    counted = re.search(r"calculating perplexity over (\d+) chunks", log)
    if result.returncode != 0 or final is None or counted is None:
        raise RuntimeError(f"llama-perplexity failed on {model} (exit {result.returncode}):\n{log[-3000:]}")
    return float(final.group(1)), int(counted.group(1))


def token_ids(model: Path, text_file: Path, home: Path | None = None) -> list[int]:
    """The ids llama.cpp's tokenizer gives ``text_file`` (read verbatim, no BOS added)."""
    result = subprocess.run([str(tool("llama-tokenize", home)), "-m", str(model), "-f", str(text_file), "--ids",
                             "--no-bos", "--no-escape", "--log-disable"], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"llama-tokenize failed on {model}:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _fetch_source(work: Path, log) -> Path:
    """Download the sdist with pip and unpack its vendor/llama.cpp into ``work``; its path."""
    log(f"downloading llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} (source) from PyPI")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(work)],
                   check=True)
    (sdist,) = work.glob("llama_cpp_python-*.tar.gz")
    prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith(prefix)]
        archive.extractall(work / "unpacked", members=members, filter="data")
    sdist.unlink()
    source = work / "unpacked" / prefix
    (source / ".git").unlink(missing_ok=True)  # a submodule pointer into a repository the sdist lacks
    return source


def _build_path() -> str:
    """PATH for the build: this environment's own scripts first (the ``cmake`` wheel of the test extras)."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def _build(source: Path, build: Path, jobs: int, log) -> None:
    nice = ["nice", "-n", "10"] if shutil.which("nice") else []
    env = {**os.environ, "PATH": _build_path()}
    log(f"configuring llama.cpp ({source})")
    subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"],
                   check=True, stdout=subprocess.DEVNULL, env=env)
    log(f"building {', '.join(TOOLS)} with {jobs} jobs (a few minutes)")
    subprocess.run([*nice, "cmake", "--build", str(build), "--config", "Release", "-j", str(jobs),
                    "--target", *TOOLS], check=True, stdout=subprocess.DEVNULL, env=env)


def _cpu_key() -> str:
    """A short hash of this CPU's instruction-set flags (a native build may not run on another CPU)."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    import platform

    return hashlib.sha256(f"{platform.machine()}\0{flags}".encode()).hexdigest()[:8]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.llamacpp_tools", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compile jobs")
    args = parser.parse_args(argv)
    try:
        print(ensure_tools(args.jobs))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
