"""Reading a Hugging Face checkpoint folder: ``config.json`` and its safetensors weights.

A safetensors file is an 8-byte little-endian header length, a JSON header that maps
each tensor name to its dtype, shape and ``[begin, end)`` byte range in the data
section, then the data section. A sharded checkpoint adds
``model.safetensors.index.json``, whose ``weight_map`` says which shard holds each
tensor. Headers are read and checked up front (every byte range must lie inside its
file, so a truncated download is caught before anything is written); tensor data is
read one tensor at a time when it is written, so memory stays at one tensor.
"""

from __future__ import annotations

import json
import os
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgemerge.convert.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors dtype -> (numpy storage dtype, item size). BF16 is stored as raw uint16.
_DTYPES: dict[str, tuple[np.dtype, int]] = {
    "F64": (np.dtype("<f8"), 8),
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),
    "I64": (np.dtype("<i8"), 8),
    "I32": (np.dtype("<i4"), 4),
    "I16": (np.dtype("<i2"), 2),
    "I8": (np.dtype("i1"), 1),
    "U8": (np.dtype("u1"), 1),
    "BOOL": (np.dtype("?"), 1),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# A header larger than this is not a real safetensors header (the format caps it at 100 MB).
_MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class TensorSource:
    """Where one tensor's bytes are: file, absolute byte range, dtype and shape."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    def load(self) -> np.ndarray:
        """The tensor as float32 (floating dtypes) or its integer dtype, read from disk."""
        storage, size = _DTYPES[self.dtype]
        count = (self.end - self.start) // size
        try:
            raw = np.fromfile(self.file, dtype=storage, count=count, offset=self.start)
        except OSError as exc:
            raise CheckpointError(f"{self.file}: cannot read tensor {self.name}: {exc}") from exc
        if raw.size != count:
            raise CheckpointError(
                f"{self.file} ended while reading tensor {self.name} (it changed on disk or is "
                "truncated); download the checkpoint again"
            )
        if self.dtype == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        elif self.dtype in FLOAT_DTYPES:
            raw = raw.astype(np.float32)
        return raw.reshape(self.shape)


@dataclass(frozen=True)
class Checkpoint:
    """A Hugging Face checkpoint folder, read and checked but with no tensor data loaded.

    Attributes:
        directory: the folder.
        config: ``config.json``; for a multimodal config its ``text_config`` entries are
            merged over the top level (the text model is what gets converted).
        architecture: the first entry of ``config["architectures"]`` (e.g. "Qwen2ForCausalLM").
        tensors: tensor name -> where its bytes are.
    """

    directory: Path
    config: dict[str, Any]
    architecture: str
    tensors: dict[str, TensorSource]

    def weight_dtype(self) -> str:
        """The safetensors dtype most of the matrices are stored in (e.g. "BF16")."""
        kinds = Counter(t.dtype for t in self.tensors.values() if len(t.shape) == 2)
        return kinds.most_common(1)[0][0] if kinds else "F32"


def open_checkpoint(directory: str | os.PathLike[str]) -> Checkpoint:
    """Read ``config.json`` and every safetensors header of ``directory``.

    Raises:
        CheckpointError: a file is missing, not valid JSON/safetensors, or truncated.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; give the Hugging Face checkpoint folder")
    config = _read_config(folder)
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        architecture = architectures[0]
    else:
        architecture = str(config.get("model_type", ""))
    return Checkpoint(folder, config, architecture, _read_tensor_index(folder))


def read_json(path: Path) -> Any:
    """Parse a JSON file; CheckpointError naming it when it cannot be read or parsed."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); download it again") from exc


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing; a Hugging Face checkpoint folder has config.json beside its "
            "safetensors files"
        )
    config = read_json(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(config).__name__}")
    text = config.get("text_config")
    if isinstance(text, dict):
        merged = dict(config)
        merged.update(text)
        # The top level says what the checkpoint is; keep its architectures.
        merged["architectures"] = config.get("architectures", text.get("architectures"))
        return merged
    return config


def _read_tensor_index(folder: Path) -> dict[str, TensorSource]:
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        index = read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path} has no weight_map; download it again")
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(
                f"{index_path} lists shard(s) that are not in {folder}: {', '.join(missing)}; "
                "download every shard"
            )
    elif (folder / SINGLE_FILE).is_file():
        weight_map, files = None, [SINGLE_FILE]
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
        weight_map = None
        if not files:
            others = sorted(p.name for p in folder.glob("*.bin")) + sorted(
                p.name for p in folder.glob("*.pth")
            )
            hint = (
                f" (found {', '.join(others[:3])}: PyTorch pickles are not read; save the model "
                "with safe_serialization=True)"
                if others
                else ""
            )
            raise CheckpointError(f"no safetensors weights in {folder}{hint}")
    tensors: dict[str, TensorSource] = {}
    for name in files:
        for source in read_safetensors_header(folder / name):
            if source.name in tensors:
                raise CheckpointError(
                    f"tensor {source.name} is in both {tensors[source.name].file.name} and "
                    f"{name}; the checkpoint is inconsistent"
                )
            tensors[source.name] = source
    if weight_map is not None:
        for tensor, file in weight_map.items():
            if tensor not in tensors:
                raise CheckpointError(
                    f"{index_path.name} places tensor {tensor} in {file}, but {file} does not "
                    "hold it; download the checkpoint again"
                )
    return tensors


def read_safetensors_header(path: Path) -> list[TensorSource]:
    """Every tensor of one safetensors file, its byte range checked against the file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{path} is truncated ({size} bytes, shorter than the 8-byte header "
                    "length); download it again"
                )
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, _MAX_HEADER):
                raise CheckpointError(
                    f"{path}: its header claims {header_len} bytes but the file has {size}; "
                    "the file is truncated or not safetensors; download it again"
                )
            header_bytes = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        header = json.loads(header_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    data_start = 8 + header_len
    sources = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        sources.append(_tensor_source(path, name, entry, data_start, size))
    return sources


def _tensor_source(path: Path, name: str, entry: Any, data_start: int, size: int) -> TensorSource:
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: header entry for {name} is not an object")
    dtype = entry.get("dtype")
    if dtype not in _DTYPES:
        raise CheckpointError(
            f"{path}: tensor {name} has dtype {dtype!r}; supported: {', '.join(_DTYPES)}"
        )
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if (
        not isinstance(shape, list)
        or not all(isinstance(d, int) and d >= 0 for d in shape)
        or not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and o >= 0 for o in offsets)
        or offsets[1] < offsets[0]
    ):
        raise CheckpointError(f"{path}: tensor {name} has a malformed shape or data_offsets")
    count = int(np.prod(shape, dtype=np.int64))
    if offsets[1] - offsets[0] != count * _DTYPES[dtype][1]:
        raise CheckpointError(
            f"{path}: tensor {name} of shape {shape} ({dtype}) needs "
            f"{count * _DTYPES[dtype][1]} bytes but its data_offsets span "
            f"{offsets[1] - offsets[0]}"
        )
    start, end = data_start + offsets[0], data_start + offsets[1]
    if end > size:
        raise CheckpointError(
            f"{path} is truncated: tensor {name} ends at byte {end} but the file has {size} "
            "bytes; download it again"
        )
    return TensorSource(name, path, dtype, tuple(shape), start, end)
