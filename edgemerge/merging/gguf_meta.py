"""A fast reader of a GGUF file's header: key/value metadata and where things are.

``gguf.GGUFReader`` builds numpy views for every array item and takes seconds
on a 150k-token vocabulary; edgemerge reads headers often (tiny test models,
calibration metadata), so it reads them directly, through a memory map. Layout:
magic, version, tensor count, KV count, the KV pairs, the tensor infos, padding
to the alignment, then the tensor data.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

_SCALAR_FORMATS: dict[gguf.GGUFValueType, str] = {
    gguf.GGUFValueType.UINT8: "<B",
    gguf.GGUFValueType.INT8: "<b",
    gguf.GGUFValueType.UINT16: "<H",
    gguf.GGUFValueType.INT16: "<h",
    gguf.GGUFValueType.UINT32: "<I",
    gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f",
    gguf.GGUFValueType.BOOL: "<?",
    gguf.GGUFValueType.UINT64: "<Q",
    gguf.GGUFValueType.INT64: "<q",
    gguf.GGUFValueType.FLOAT64: "<d",
}

KV = tuple[gguf.GGUFValueType, Any, Any]  # (type, value, array item type or None)


@dataclass(frozen=True)
class GGUFHeader:
    """The parsed header of a GGUF file.

    Attributes:
        version: GGUF version (2 or 3).
        n_tensors: tensor count.
        kvs: key -> (value type, value, array item type); strings are bytes, arrays tuples.
        kv_ranges: key -> (start, end) byte range of the whole pair in the file.
        info_range: (start, end) byte range of the tensor infos.
        alignment: data alignment (``general.alignment``, default 32).
        data_offset: where the tensor data starts.
    """

    version: int
    n_tensors: int
    kvs: dict[str, KV]
    kv_ranges: dict[str, tuple[int, int]]
    info_range: tuple[int, int]
    alignment: int
    data_offset: int


def read_header(path: str | Path) -> GGUFHeader:
    """Parse the header of ``path``; ValueError naming the file when it is not valid GGUF."""
    path = Path(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (bad magic {data[:4]!r})")
        (version,) = struct.unpack_from("<I", data, 4)
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (need 2 or 3)")
        n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
        offset = 24
        kvs: dict[str, KV] = {}
        ranges: dict[str, tuple[int, int]] = {}
        try:
            for _ in range(n_kv):
                start = offset
                key, offset = _read_string(data, offset)
                (raw_type,) = struct.unpack_from("<I", data, offset)
                vtype = gguf.GGUFValueType(raw_type)
                offset += 4
                if vtype == gguf.GGUFValueType.ARRAY:
                    (raw_item,) = struct.unpack_from("<I", data, offset)
                    item = gguf.GGUFValueType(raw_item)
                    value, offset = _read_array(data, offset + 4, item)
                    kvs[key.decode()] = (vtype, value, item)
                else:
                    value, offset = _read_scalar(data, offset, vtype)
                    kvs[key.decode()] = (vtype, value, None)
                ranges[key.decode()] = (start, offset)
            info_start = offset
            for _ in range(n_tensors):
                _, offset = _read_string(data, offset)
                (n_dims,) = struct.unpack_from("<I", data, offset)
                offset += 4 + 8 * n_dims + 4 + 8
            if offset > len(data):
                raise ValueError("tensor infos run past the end of the file")
        except (struct.error, ValueError) as err:
            raise ValueError(f"{path}: corrupt GGUF header ({err})") from err
    align_kv = kvs.get("general.alignment")
    alignment = int(align_kv[1]) if align_kv else 32
    data_offset = offset + (-offset) % alignment
    return GGUFHeader(version, n_tensors, kvs, ranges, (info_start, offset), alignment, data_offset)


def _read_string(data: Any, offset: int) -> tuple[bytes, int]:
    (length,) = struct.unpack_from("<Q", data, offset)
    start = offset + 8
    if start + length > len(data):
        raise ValueError("string runs past the end of the file")
    return bytes(data[start : start + length]), start + length


def _read_scalar(data: Any, offset: int, vtype: gguf.GGUFValueType) -> tuple[Any, int]:
    if vtype == gguf.GGUFValueType.STRING:
        return _read_string(data, offset)
    fmt = _SCALAR_FORMATS.get(vtype)
    if fmt is None:
        raise ValueError(f"unexpected value type {vtype.name}")
    (value,) = struct.unpack_from(fmt, data, offset)
    return value, offset + struct.calcsize(fmt)


def _read_array(data: Any, offset: int, item: gguf.GGUFValueType) -> tuple[tuple[Any, ...], int]:
    (count,) = struct.unpack_from("<Q", data, offset)
    offset += 8
    if item == gguf.GGUFValueType.STRING:
        items = []
        for _ in range(count):
            value, offset = _read_string(data, offset)
            items.append(value)
        return tuple(items), offset
    fmt = _SCALAR_FORMATS.get(item)
    if fmt is None:
        raise ValueError(f"unexpected array item type {item.name}")
    values = np.frombuffer(data, dtype=np.dtype(fmt), count=count, offset=offset)
    return tuple(values.tolist()), offset + values.nbytes
