"""Requantize a GGUF model with llama.cpp's own quantizer, cached under ~/.cache/ope_prep/models.

    python -m ope_prep.requantize models/SmolLM2-135M-Instruct.Q4_1.gguf Q4_K_M [Q8_0 ...]

The tests use it to run the exactness checks on every common weight layout from the one
model the embedded default ships; a user can use it to try a policy at another quantization.
Requantizing an already quantized file loses quality (llama.cpp's `allow_requantize`), which
does not matter for exactness: what is tested is that sampling and teacher forcing agree.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import llama_cpp

from .digests import file_sha256

CACHE = Path(os.environ.get("OPE_PREP_MODEL_CACHE", Path.home() / ".cache" / "ope_prep" / "models"))

# The llama_ftype for each name llama.cpp's own `llama-quantize` accepts (the ones used here).
FTYPES = {
    "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "Q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1,
    "Q5_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_0,
    "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "Q5_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "Q6_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
    "F32": llama_cpp.LLAMA_FTYPE_ALL_F32,       # the weights dequantized: the accuracy reference
}


def requantized(source: Path | str, ftype: str, n_threads: int = 2) -> Path:
    """The source model requantized to `ftype`; built once per (source content, ftype)."""
    source = Path(source)
    if ftype not in FTYPES:
        raise ValueError(f"unknown quantization {ftype!r}; one of {', '.join(FTYPES)}")
    out = CACHE / f"{source.stem}.{file_sha256(source)[:12]}.{ftype}.gguf"
    if out.is_file():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.allow_requantize = True
    params.nthread = n_threads
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize {source} -> {ftype} failed (code {rc})")
    tmp.replace(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source")
    ap.add_argument("ftypes", nargs="+", choices=sorted(FTYPES))
    args = ap.parse_args()
    for ftype in args.ftypes:
        print(requantized(args.source, ftype))


if __name__ == "__main__":
    main()
