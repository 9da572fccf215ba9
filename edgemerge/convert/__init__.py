"""``edgemerge convert``: Hugging Face checkpoints (llama, qwen2, gemma3) to GGUF.

    from edgemerge.convert import convert
    convert("Qwen2.5-0.5B-Instruct/", "qwen.gguf", outtype="f16", quantize_to="Q4_K_M")

No tokenizer or tensor library beyond numpy and ``gguf`` is needed: safetensors,
``tokenizer.json`` and SentencePiece ``tokenizer.model`` files are read directly.
See docs/convert.md for what is written and why.
"""

from edgemerge._lazy import lazy_submodules
from edgemerge.convert.command import add_convert_parser, run_convert
from edgemerge.convert.errors import (
    CheckpointError,
    ConvertError,
    QuantizeError,
    TensorMismatchError,
    TokenizerError,
    UnsupportedModelError,
)
from edgemerge.convert.quantize import OUTTYPES, QUANT_TYPES
from edgemerge.convert.writer import ConvertResult, convert

__all__ = [
    "OUTTYPES",
    "QUANT_TYPES",
    "CheckpointError",
    "ConvertError",
    "ConvertResult",
    "QuantizeError",
    "TensorMismatchError",
    "TokenizerError",
    "UnsupportedModelError",
    "add_convert_parser",
    "convert",
    "run_convert",
]

__getattr__, __dir__ = lazy_submodules(globals())
