"""`python -m ope_prep.backends.serve --config_file F`: llama_cpp.server on llama.cpp's one
numeric path (engine.NUMERIC_SETTINGS), as the managed server runs it.

llama_cpp.server keeps the previous request's tokens and decodes only what differs, so a
request's batch shapes depend on the request before it. With llama.cpp's shape-dependent
kernels (the tiled K-quant matmul, repacked weights) a score could then depend on request order,
and a resumed oracle would not reproduce an uninterrupted one. Its settings cannot turn those
kernels off, so this entry point does before the server loads a model; flash attention is off
in the server's model settings (server.py).
"""

import os
import runpy

os.environ["GGML_CPU_TILED_MM"] = "0"    # read at the first matrix product

import llama_cpp.llama_cpp as _capi  # noqa: E402

_default_model_params = _capi.llama_model_default_params


def _model_params():
    params = _default_model_params()
    params.use_extra_bufts = False        # no repacked weights
    return params


_capi.llama_model_default_params = _model_params   # what llama_cpp.Llama reads its defaults from

if __name__ == "__main__":
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
