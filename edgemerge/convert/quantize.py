"""Output types: plain ones written by numpy, K-quants by the patched libllama's quantizer.

``--outtype`` (f32, f16, bf16, q8_0, or auto = the checkpoint's own float type)
applies to the 2-D weight matrices; norm weights, biases and generated vectors stay
float32, as in llama.cpp's conversions. A matrix whose rows do not split into q8_0
blocks of 32 is written f16 instead.

``--quantize`` (Q4_K_M, Q5_K_M, ...) converts first to an intermediate GGUF of the
outtype, then calls ``llama_model_quantize`` from the libllama that ``import
edgemerge`` loads, which picks the per-tensor mixture the ftype names (and its own
fallbacks for rows that do not fit 256-value K blocks).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import gguf
import numpy as np

from edgemerge.convert.errors import ConvertError, QuantizeError

Q = gguf.GGMLQuantizationType
OUTTYPES: tuple[str, ...] = ("auto", "f32", "f16", "bf16", "q8_0")
_OUT_QTYPE = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
# What "auto" resolves to, from the safetensors dtype of the matrices: lossless.
_AUTO = {"F32": "f32", "F64": "f32", "F16": "f16", "BF16": "bf16"}
# llama_ftype names accepted by --quantize (those that need no importance matrix).
QUANT_TYPES: tuple[str, ...] = (
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q8_0",
    "Q2_K",
    "Q3_K_S",
    "Q3_K_M",
    "Q3_K_L",
    "Q4_K_S",
    "Q4_K_M",
    "Q5_K_S",
    "Q5_K_M",
    "Q6_K",
)
_F16_MAX = float(np.finfo(np.float16).max)


def resolve_outtype(outtype: str, weight_dtype: str) -> str:
    """``outtype`` with "auto" replaced by the checkpoint's own float type."""
    if outtype not in OUTTYPES:
        raise ConvertError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    if outtype == "auto":
        return _AUTO.get(weight_dtype, "f32")
    return outtype


def tensor_qtype(outtype: str, shape: tuple[int, ...], matrix: bool) -> gguf.GGMLQuantizationType:
    """The GGML type one tensor is stored in for a resolved ``outtype``."""
    if not matrix:
        return Q.F32
    qtype = _OUT_QTYPE[outtype]
    if qtype == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] != 0:
        return Q.F16
    return qtype


def stored_shape_and_bytes(
    shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType
) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, numpy dtype, byte count) of the array ``encode`` returns, for the writer."""
    if qtype == Q.F32:
        return shape, np.dtype(np.float32), int(np.prod(shape)) * 4
    if qtype == Q.F16:
        return shape, np.dtype(np.float16), int(np.prod(shape)) * 2
    byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))


def encode(name: str, array: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """``array`` (float32) in ``qtype``'s storage form."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ConvertError(f"tensor {name} holds NaN or infinite values; the checkpoint is broken")
    if qtype == Q.F16 and array.size and float(np.abs(array).max()) > _F16_MAX:
        raise ConvertError(
            f"tensor {name} has values beyond float16's range (|x| up to "
            f"{float(np.abs(array).max()):.3g}); use --outtype bf16 or f32"
        )
    return gguf.quants.quantize(array, qtype)


def quant_ftype(name: str) -> int:
    """The ``llama_ftype`` value of a --quantize name (case-insensitive)."""
    import llama_cpp

    key = name.upper()
    if key not in QUANT_TYPES:
        raise QuantizeError(f"--quantize {name!r} is not one of {', '.join(QUANT_TYPES)}")
    return int(getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{key}"))


def quantize_file(src: Path, dst: Path, name: str, n_threads: int | None = None) -> list[str]:
    """Quantize GGUF ``src`` into ``dst`` with libllama (``dst`` is overwritten).

    libllama's log is collected rather than printed (one line per tensor otherwise).

    Returns:
        libllama's summary notes worth showing (e.g. how many tensors needed a fallback type).

    Raises:
        QuantizeError: the name is unknown or libllama reports a failure (with its message).
    """
    # edgemerge/__init__ has run (this is a submodule): llama_cpp loads our libllama.
    import llama_cpp

    from edgemerge.native import _llamalog

    ftype = quant_ftype(name)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = n_threads or max(1, min(os.cpu_count() or 1, 8))
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(_level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        status = llama_cpp.llama_model_quantize(
            os.fsencode(src), os.fsencode(dst), ctypes.byref(params)
        )
    finally:
        _llamalog.install()
    text = "".join(lines)
    if status != 0:
        reasons = [ln.strip() for ln in text.splitlines() if "fail" in ln or "error" in ln.lower()]
        detail = "; ".join(reasons[-3:]) or "no message from llama.cpp"
        raise QuantizeError(f"libllama could not quantize to {name.upper()}: {detail}")
    return [
        ln.split("WARNING: ", 1)[-1].strip()
        for ln in text.splitlines()
        if "fallback quantization" in ln
    ]
