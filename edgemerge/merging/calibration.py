"""Per-layer merge thresholds, measured on real text and stored in the GGUF.

Raw key similarities mean nothing across models or even across layers
(DESIGN-NOTES §3): what a planner needs per layer is "how similar is similar
*here*". ``edgemerge calibrate`` runs the model over calibration text, takes the
adjacent-key cosine of every pair in every mergeable layer (centred or not, as
``MergeSettings.centre`` says; averaged over heads), and sets each layer's
threshold at the quantile that leaves the fraction of pairs the budget needs above
it: with budget ``b`` (the share of cells kept), a fraction ``1 - b`` of pairs
must join, so the threshold is the ``b``-quantile of that layer's pair scores. The
planner then scores a pair by its similarity minus the layer's threshold, averaged
over the similarity layers (``MergeSettings(threshold="calibrated")``). Averaging
per-layer offsets shifts every pair by one constant, so what calibration sets is
the cut (how similar a pair must be before it merges without the budget asking),
not the order in which pairs merge; docs/convert.md has the measurement against
global thresholds (``bench/calibration_vs_global.py``).

Metadata, version 1, in a copy of the GGUF (every original key and tensor kept,
so stock llama.cpp still loads it):

- ``edgemerge.calibration.version`` (uint32): 1
- ``edgemerge.calibration.thresholds`` (float32 array, one per model layer; NaN
  for layers that are not merged, e.g. Gemma 3's sliding-window layers)
- ``edgemerge.calibration.budget`` (float32), ``edgemerge.calibration.n_tokens``
  (uint32), ``edgemerge.calibration.text`` (string: where the text came from)
- ``edgemerge.calibration.n_head_kv`` (uint32) and ``edgemerge.calibration.head_mean`` /
  ``head_std`` (float32 arrays, ``n_layer * n_head_kv``, layer-major; NaN for layers
  that are not merged): mean and standard deviation of each head's adjacent
  similarity on the calibration text, so the file says how similar "similar" is per
  head, not only where each layer's cut lies
- ``edgemerge.merge.<field>``: the MergeSettings the calibration assumed
  (``MergeSettings.to_dict``), so the file says how it was meant to be used;
  ``edgemerge.merge.centre`` says which cosine the thresholds are on (a file
  without it predates the setting and was centred).
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemerge.merging.gguf_meta import read_header
from edgemerge.settings import CALIBRATED, MergeSettings

VERSION = 1
PREFIX = "edgemerge."
_GGUF_MAGIC = b"GGUF"
# gguf value types
_U32, _I32, _F32, _BOOL, _STR, _ARR = 4, 5, 6, 7, 8, 9


class CalibrationError(ValueError):
    """Calibration metadata is missing a key, has a wrong version, or the input is unusable."""


@dataclass(frozen=True)
class Calibration:
    """Per-layer thresholds of one model.

    Attributes:
        thresholds: float32 [n_layer of the model]; NaN where a layer is not merged.
        budget: the share of cells kept that the thresholds were derived for.
        n_tokens: calibration tokens.
        text: what the calibration text was.
        settings: the MergeSettings assumed.
        head_mean, head_std: float32 [n_layer, n_head_kv] statistics of each head's centred
            adjacent similarity; NaN rows for layers that are not merged (None when the file
            predates them).
    """

    thresholds: np.ndarray
    budget: float
    n_tokens: int
    text: str
    settings: MergeSettings
    head_mean: np.ndarray | None = None
    head_std: np.ndarray | None = None


def layer_thresholds(similarity: np.ndarray, budget: float) -> np.ndarray:
    """Thresholds per layer from centred adjacent similarities.

    Args:
        similarity: float32 [n_layer, n_head, n_pair], from
            ``reference.similarity.adjacent_similarity``.
        budget: share of cells kept, in (0, 1].

    Returns:
        float32 [n_layer]: the ``budget``-quantile of each layer's head-averaged pair scores.
    """
    if not 0.0 < budget <= 1.0 or not math.isfinite(budget):
        raise CalibrationError(f"budget: {budget!r} must be a share of cells in (0, 1]")
    per_layer = np.asarray(similarity, np.float64).mean(axis=1)
    if per_layer.shape[1] < 2:
        raise CalibrationError("calibration needs at least 3 tokens of text")
    return np.quantile(per_layer, budget, axis=1).astype(np.float32)


def calibrate(
    model_path: str | Path,
    tokens: list[int],
    *,
    budget: float = 0.5,
    text: str = "",
    settings: MergeSettings | None = None,
) -> Calibration:
    """Run the model over ``tokens`` and derive per-layer thresholds for ``budget``.

    The similarities are centred or not as ``settings.centre`` says (default
    ``MergeSettings().centre``): thresholds only mean something on the cosine the
    runtime computes, so the stored settings record it and ``edgemerge.Llama``
    refuses a calibration made with the other choice.
    """
    from edgemerge.native.capture import capture_kv
    from edgemerge.reference.similarity import adjacent_similarity

    base = settings or MergeSettings()
    cap = capture_kv(str(model_path), tokens, n_obs=0, flash_attn=True)
    sim = adjacent_similarity(cap.keys, centre=base.centre)
    per = layer_thresholds(sim, budget)
    n_model_layers = int(cap.layout.n_layer)
    merged = np.asarray(cap.layers)
    thresholds = np.full(n_model_layers, np.nan, np.float32)
    thresholds[merged] = per
    head_mean = np.full((n_model_layers, sim.shape[1]), np.nan, np.float32)
    head_std = np.full_like(head_mean, np.nan)
    head_mean[merged] = sim.mean(axis=2, dtype=np.float64)
    head_std[merged] = sim.std(axis=2, dtype=np.float64)
    used = dataclasses.replace(base, threshold=CALIBRATED, budget=float(budget))
    return Calibration(thresholds, float(budget), len(tokens), text, used, head_mean, head_std)


# -- GGUF metadata -----------------------------------------------------------------------


def _kv(key: str, vtype: int, value: object) -> bytes:
    kb = key.encode()
    out = struct.pack("<Q", len(kb)) + kb + struct.pack("<I", vtype)
    if vtype == _U32:
        return out + struct.pack("<I", int(value))
    if vtype == _I32:
        return out + struct.pack("<i", int(value))
    if vtype == _F32:
        return out + struct.pack("<f", float(value))
    if vtype == _BOOL:
        return out + struct.pack("<B", 1 if value else 0)
    if vtype == _STR:
        vb = str(value).encode()
        return out + struct.pack("<Q", len(vb)) + vb
    arr = np.asarray(value)
    if arr.dtype.kind == "f":
        return out + struct.pack("<IQ", _F32, arr.size) + arr.astype("<f4").tobytes()
    return out + struct.pack("<IQ", _I32, arr.size) + arr.astype("<i4").tobytes()


def _metadata(cal: Calibration) -> list[bytes]:
    kvs = [
        _kv(PREFIX + "calibration.version", _U32, VERSION),
        _kv(PREFIX + "calibration.thresholds", _ARR, cal.thresholds.astype(np.float32)),
        _kv(PREFIX + "calibration.budget", _F32, cal.budget),
        _kv(PREFIX + "calibration.n_tokens", _U32, cal.n_tokens),
        _kv(PREFIX + "calibration.text", _STR, cal.text),
    ]
    if cal.head_mean is not None and cal.head_std is not None:
        kvs += [
            _kv(PREFIX + "calibration.n_head_kv", _U32, cal.head_mean.shape[1]),
            _kv(PREFIX + "calibration.head_mean", _ARR, cal.head_mean.astype(np.float32).ravel()),
            _kv(PREFIX + "calibration.head_std", _ARR, cal.head_std.astype(np.float32).ravel()),
        ]
    for name, value in cal.settings.to_dict().items():
        key = PREFIX + "merge." + name
        if isinstance(value, bool):
            kvs.append(_kv(key, _BOOL, value))
        elif isinstance(value, int):
            kvs.append(_kv(key, _I32, value))
        elif isinstance(value, float):
            kvs.append(_kv(key, _F32, value))
        elif isinstance(value, list):
            kvs.append(_kv(key, _ARR, np.asarray(value, np.int32)))
        else:
            kvs.append(_kv(key, _STR, value))
    return kvs


def write_calibrated(src: str | Path, dst: str | Path, cal: Calibration) -> Path:
    """Copy ``src`` to ``dst`` with ``cal`` in its metadata (earlier edgemerge keys replaced).

    The tensor data is copied byte for byte; only the header grows. The output is
    written to a temporary file and renamed, so a failure leaves nothing behind.
    """
    src, dst = Path(src), Path(dst)
    head = read_header(src)
    raw = np.memmap(src, np.uint8, mode="r")
    kept = [raw[a:b].tobytes() for k, (a, b) in head.kv_ranges.items() if not k.startswith(PREFIX)]
    new = _metadata(cal)
    header = _GGUF_MAGIC + struct.pack("<IQQ", head.version, head.n_tensors, len(kept) + len(new))
    infos = raw[head.info_range[0] : head.info_range[1]].tobytes()
    body = header + b"".join(kept) + b"".join(new) + infos
    pad = (-len(body)) % head.alignment
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            out.write(body + b"\0" * pad)
            step = 64 << 20
            for i in range(head.data_offset, len(raw), step):
                out.write(raw[i : i + step].tobytes())
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dst


def read_calibration(path: str | Path) -> Calibration | None:
    """The calibration stored in a GGUF, or None when it has none."""
    fields = read_header(path).kvs
    if PREFIX + "calibration.version" not in fields:
        return None

    def value(key: str):  # noqa: ANN202
        entry = fields.get(PREFIX + key)
        if entry is None:
            raise CalibrationError(f"{path}: calibration key {PREFIX + key} is missing")
        v = entry[1]
        if isinstance(v, bytes):
            return v.decode()
        return np.array(v) if isinstance(v, tuple) else v

    version = int(value("calibration.version"))
    if version != VERSION:
        raise CalibrationError(
            f"{path}: edgemerge calibration version {version} is not supported (this edgemerge "
            f"reads version {VERSION}); run `edgemerge calibrate` again"
        )
    settings = {}
    for name in MergeSettings.__dataclass_fields__:
        if PREFIX + "merge." + name in fields:
            v = value("merge." + name)
            if isinstance(v, np.ndarray):
                v = [int(x) for x in v]
            elif isinstance(v, float):
                v = float(f"{v:.7g}")  # stored as float32
            settings[name] = v
    settings.setdefault("centre", True)  # calibrations before the setting were centred
    thresholds = np.asarray(value("calibration.thresholds"), np.float32)
    head_mean = head_std = None
    if PREFIX + "calibration.n_head_kv" in fields:
        n_head = int(value("calibration.n_head_kv"))
        shape = (thresholds.shape[0], n_head)
        head_mean = np.asarray(value("calibration.head_mean"), np.float32)
        head_std = np.asarray(value("calibration.head_std"), np.float32)
        if n_head < 1 or head_mean.size != shape[0] * n_head or head_std.size != head_mean.size:
            raise CalibrationError(
                f"{path}: calibration head statistics do not match {shape[0]} layers x "
                f"{n_head} heads; run `edgemerge calibrate` again"
            )
        head_mean, head_std = head_mean.reshape(shape), head_std.reshape(shape)
    return Calibration(
        thresholds=thresholds,
        budget=float(value("calibration.budget")),
        n_tokens=int(value("calibration.n_tokens")),
        text=str(value("calibration.text")),
        settings=MergeSettings.from_dict(settings),
        head_mean=head_mean,
        head_std=head_std,
    )


def default_text() -> tuple[str, str]:
    """Calibration text that ships with the system: (text, where it came from).

    The GPL-3 licence (prose; its folder follows ``EDGEMERGE_LICENSES_DIR``), else the
    source of Python's ``os`` module, which every CPython has.
    """
    from edgemerge.evaluation.texts import licence

    sources = [licence("GPL-3").path, Path(os.__file__)]
    for src in sources:
        if src.is_file():
            return src.read_text(errors="replace"), str(src)
    raise CalibrationError("no default calibration text found; pass --text FILE")


def run_calibrate(
    model: str,
    output: str,
    text_file: str | None,
    budget: float,
    max_tokens: int,
    *,
    centre: bool = MergeSettings.centre,
) -> Path:
    """The ``edgemerge calibrate`` command: returns the written file."""
    import llama_cpp

    from edgemerge.models import resolve_model

    path = resolve_model(model)
    if text_file is not None:
        try:
            text, source = Path(text_file).read_text(errors="replace"), text_file
        except OSError as exc:
            raise CalibrationError(f"--text {text_file}: {exc.strerror or exc}") from exc
    else:
        text, source = default_text()
    out = Path(output)
    if out.resolve() == path.resolve():
        raise CalibrationError(f"-o {output} is the input model; write the copy elsewhere")
    vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    tokens = vocab.tokenize(text.encode())[:max_tokens]
    del vocab
    cal = calibrate(path, tokens, budget=budget, text=source, settings=MergeSettings(centre=centre))
    return write_calibrated(path, out, cal)
