"""Hugging Face checkpoint -> GGUF: check everything, then stream tensors into a temp file.

Order of work, so that bad input costs nothing and leaves nothing behind:

1. read config.json, every safetensors header and the tokenizer; plan every GGUF
   tensor and check names and shapes against config.json (no tensor data read yet);
2. write the GGUF to a hidden temporary file beside the output, one tensor in memory
   at a time, with a progress bar over the bytes read;
3. quantize with libllama when asked (into a second temporary file);
4. rename into place. Any failure or interrupt deletes the temporary files, so the
   output path either holds a complete GGUF or is untouched.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gguf
from tqdm import tqdm

from edgemerge.convert import archs, quantize
from edgemerge.convert.errors import ConvertError, TensorMismatchError
from edgemerge.convert.hf import Checkpoint, open_checkpoint
from edgemerge.convert.tokenizer import Tokenizer, add_tokenizer, read_tokenizer


@dataclass(frozen=True)
class ConvertResult:
    """What ``convert`` wrote.

    Attributes:
        path: the GGUF file.
        arch: its GGUF architecture.
        outtype: the resolved matrix type of the (intermediate) conversion.
        quantize: the libllama ftype applied afterwards, or None.
        n_tensors: tensors written.
        n_vocab: tokenizer entries (including ``[PAD<id>]`` padding).
        ignored: checkpoint tensors deliberately not written (e.g. a tied lm_head).
        notes: libllama's quantizer notes (e.g. tensors that needed a fallback type).
    """

    path: Path
    arch: str
    outtype: str
    quantize: str | None
    n_tensors: int
    n_vocab: int
    ignored: tuple[str, ...]
    notes: tuple[str, ...] = ()


def convert(
    hf_dir: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    outtype: str = "auto",
    quantize_to: str | None = None,
    progress: bool | None = None,
    n_threads: int | None = None,
) -> ConvertResult:
    """Convert the Hugging Face checkpoint in ``hf_dir`` into the GGUF file ``output``.

    Args:
        hf_dir: folder with config.json, safetensors weights and tokenizer files.
        output: GGUF path to write; replaced atomically when everything succeeded.
        outtype: type of the weight matrices: f32, f16, bf16, q8_0 or auto (the
            checkpoint's own float type).
        quantize_to: a libllama ftype name (Q4_K_M, Q5_K_M, ...) applied after conversion.
        progress: show a progress bar; None shows one when stderr is a terminal.
        n_threads: threads for libllama's quantizer (default: up to 8 cores).

    Raises:
        ConvertError: (a subclass naming the file/tensor at fault) for any bad input.
    """
    out = Path(output)
    if out.is_dir():
        raise ConvertError(f"-o {out} is a folder; give the GGUF file to write")
    if not out.parent.is_dir():
        raise ConvertError(f"-o {out}: folder {out.parent} does not exist")
    if quantize_to is not None:
        quantize.quant_ftype(quantize_to)  # an unknown name fails before any work
        if outtype == "q8_0":
            raise ConvertError(
                "--quantize needs an unquantized intermediate; use --outtype f32, f16 or bf16"
            )
    ckpt = open_checkpoint(hf_dir)
    arch = archs.architecture_of(ckpt)
    hp = archs.read_hparams(arch, ckpt.config)
    # Gemma 3 drops embedding rows past the tokenizer; the others pad the tokenizer instead.
    tok = read_tokenizer(ckpt.directory, ckpt.config, None if arch == "gemma3" else hp.vocab_size)
    n_vocab = len(tok.tokens)
    if n_vocab > hp.vocab_size:
        raise TensorMismatchError(
            f"the tokenizer defines {n_vocab} tokens but the embedding has {hp.vocab_size} rows "
            "(config.json vocab_size); the tokenizer does not belong to these weights"
        )
    plan, ignored = archs.plan_tensors(ckpt, hp, n_vocab)
    resolved = quantize.resolve_outtype(outtype, ckpt.weight_dtype())
    notes: list[str] = []
    with _temporary_beside(out) as converted:
        _write_gguf(converted, ckpt, hp, tok, plan, resolved, progress)
        if quantize_to is None:
            os.replace(converted, out)
        else:
            with _temporary_beside(out) as quantized:
                notes = quantize.quantize_file(converted, quantized, quantize_to, n_threads)
                os.replace(quantized, out)
    return ConvertResult(
        path=out,
        arch=arch,
        outtype=resolved,
        quantize=quantize_to.upper() if quantize_to else None,
        n_tensors=len(plan),
        n_vocab=n_vocab,
        ignored=tuple(ignored),
        notes=tuple(notes),
    )


@contextmanager
def _temporary_beside(path: Path) -> Iterator[Path]:
    """A hidden temporary file in ``path``'s folder (so a rename is atomic), always removed."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _write_gguf(
    path: Path,
    ckpt: Checkpoint,
    hp: archs.Hparams,
    tok: Tokenizer,
    plan: list[archs.PlannedTensor],
    outtype: str,
    progress: bool | None,
) -> None:
    writer = gguf.GGUFWriter(path, hp.arch)
    try:
        writer.add_name(_model_name(ckpt))
        writer.add_file_type(int(quantize.FILE_TYPES[outtype]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        archs.add_model_metadata(writer, hp, len(tok.tokens))
        add_tokenizer(writer, tok)
        qtypes = []
        for pt in plan:
            qtype = quantize.tensor_qtype(outtype, pt.out_shape, pt.matrix)
            shape, dtype, nbytes = quantize.stored_shape_and_bytes(pt.out_shape, qtype)
            raw = qtype if dtype == "uint8" else None
            writer.add_tensor_info(pt.name, shape, dtype, nbytes, raw_dtype=raw)
            qtypes.append(qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(
            ckpt.tensors[pt.source].end - ckpt.tensors[pt.source].start for pt in plan if pt.source
        )
        bar = tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc=f"convert {hp.arch} -> {outtype}",
            disable=None if progress is None else not progress,
            leave=False,
        )
        with bar:
            for pt, qtype in zip(plan, qtypes, strict=True):
                if pt.source is None:
                    array = pt.data
                else:
                    source = ckpt.tensors[pt.source]
                    array = source.load()
                    if pt.transform is not None:
                        array = pt.transform(array)
                    bar.update(source.end - source.start)
                if array is None or tuple(array.shape) != pt.out_shape:
                    raise TensorMismatchError(f"tensor {pt.name}: internal shape error")
                writer.write_tensor_data(quantize.encode(pt.source or pt.name, array, qtype))
    finally:
        writer.close()


def _model_name(ckpt: Checkpoint) -> str:
    name = ckpt.config.get("_name_or_path")
    if isinstance(name, str) and name.strip():
        return Path(name.rstrip("/")).name
    return ckpt.directory.resolve().name
