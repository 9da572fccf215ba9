"""The ``edgemerge convert`` subcommand: argparse wiring around :func:`convert`."""

from __future__ import annotations

import argparse

from edgemerge.convert.quantize import OUTTYPES, QUANT_TYPES
from edgemerge.convert.writer import convert


def add_convert_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``convert`` to ``subparsers``; its ``func`` default is :func:`run_convert`."""
    p = subparsers.add_parser(
        "convert",
        help="Hugging Face checkpoint (llama, qwen2, gemma3) -> GGUF",
        description=(
            "Convert a Hugging Face checkpoint folder (config.json, safetensors, tokenizer) "
            "into one GGUF file. Supported: LlamaForCausalLM, Qwen2ForCausalLM, "
            "Gemma3ForCausalLM (and the text model of Gemma3ForConditionalGeneration)."
        ),
    )
    p.add_argument("hf_dir", metavar="HF_DIR", help="the checkpoint folder")
    p.add_argument("-o", "--output", required=True, metavar="OUT.gguf", help="GGUF file to write")
    p.add_argument(
        "--outtype",
        choices=OUTTYPES,
        default="auto",
        help="type of the weight matrices (default auto: the checkpoint's own float type)",
    )
    p.add_argument(
        "--quantize",
        metavar="TYPE",
        type=str.upper,
        choices=QUANT_TYPES,
        default=None,
        help=f"then quantize with libllama: {', '.join(QUANT_TYPES)}",
    )
    p.add_argument("--threads", type=int, default=None, help="quantizer threads (default: cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_convert)
    return p


def run_convert(args: argparse.Namespace) -> int:
    """Run the parsed ``convert`` command; ConvertError propagates for the CLI to print."""
    result = convert(
        args.hf_dir,
        args.output,
        outtype=args.outtype,
        quantize_to=args.quantize,
        progress=False if args.no_progress else None,
        n_threads=args.threads,
    )
    kind = result.quantize or result.outtype
    print(
        f"{result.path}: {result.arch}, {result.n_tensors} tensors, {kind}, {result.n_vocab} tokens"
    )
    for note in result.notes:
        print(f"llama.cpp quantizer: {note}")
    if result.ignored:
        print(f"left out (not used by the {result.arch} graph): {', '.join(result.ignored)}")
    return 0
