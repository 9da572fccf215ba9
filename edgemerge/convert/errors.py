"""Errors of ``edgemerge convert``: every one names the file or tensor at fault and what to do."""

from __future__ import annotations


class ConvertError(Exception):
    """A Hugging Face checkpoint could not be converted; the message says why and what to do."""


class CheckpointError(ConvertError):
    """A checkpoint file is missing, unreadable, truncated or not what its name says."""


class UnsupportedModelError(ConvertError):
    """The architecture, or a feature of it, is one this converter does not write."""


class TensorMismatchError(ConvertError):
    """A tensor is missing, has the wrong shape, or is not one the architecture has."""


class TokenizerError(ConvertError):
    """The tokenizer files are missing or in a form this converter does not read."""


class QuantizeError(ConvertError):
    """A quantization type is unknown, or libllama's quantizer failed."""
