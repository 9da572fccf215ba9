"""A checkpoint's tokenizer as GGUF ``tokenizer.*`` metadata, read without tokenizer libraries.

Two forms are read, as llama.cpp's own converter does, ``tokenizer.model`` first:

``tokenizer.model`` (SentencePiece, BPE kind: Llama 1/2, Mistral, Gemma)
    A protobuf ``ModelProto``: its pieces (text, score, type) become
    ``tokenizer.ggml.tokens/scores/token_type`` with GGUF model "llama"; the trainer
    spec gives unk/bos/eos/pad ids and the normalizer spec ``add_dummy_prefix``
    (``tokenizer.ggml.add_space_prefix``). Only the few fields needed are decoded.

``tokenizer.json`` (byte-level BPE: Qwen2, Llama 3, GPT-2)
    The BPE vocabulary and merges become GGUF model "gpt2". The pre-tokenizer split
    regex decides ``tokenizer.ggml.pre`` (llama.cpp re-implements each known regex
    under a name); an unknown regex is an error rather than a silently wrong tokenizer.

Either way, added tokens become CONTROL (special) or USER_DEFINED tokens, ids the
tokenizer does not define up to the model's ``vocab_size`` become ``[PAD<id>]``
UNUSED tokens, the special token ids and ``add_bos``/``add_eos`` come from
``tokenizer_config.json``/``special_tokens_map.json``/``config.json``, and the chat
template from ``tokenizer_config.json`` (or ``chat_template.jinja``/``.json``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from edgemerge.convert.errors import CheckpointError, TokenizerError
from edgemerge.convert.hf import read_json

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = (int(t) for t in gguf.TokenType)

# The split regexes of the byte-level BPE pre-tokenizers llama.cpp implements, exactly as
# they appear in tokenizer.json, and the name llama.cpp knows each by.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
KNOWN_PRE_TOKENIZERS: dict[str, str] = {
    (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    ): "qwen2",
    (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
        r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ): "llama-bpe",
    _GPT2_REGEX: "gpt2",
}
_SPECIAL_KINDS = ("bos", "eos", "unk", "pad")
_SPM_BPE = 2  # TrainerSpec.ModelType.BPE


@dataclass(frozen=True)
class Tokenizer:
    """Everything ``tokenizer.*`` in the GGUF says; ``None`` fields are not written."""

    model: str
    pre: str
    tokens: list[bytes]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[bytes] | None = None
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool | None = None
    add_eos: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | None = None
    named_chat_templates: dict[str, str] = field(default_factory=dict)
    source: str = ""  # the file it was read from


def read_tokenizer(folder: Path, config: dict[str, Any], vocab_size: int | None) -> Tokenizer:
    """The tokenizer of checkpoint ``folder``, padded with UNUSED tokens to ``vocab_size``.

    Raises:
        TokenizerError: no tokenizer file, an unsupported kind, a malformed file, or more
            tokens than ``vocab_size``.
    """
    try:
        return _read_tokenizer(folder, config, vocab_size)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise TokenizerError(
            f"{folder}: the tokenizer files are malformed ({type(exc).__name__}: {exc}); "
            "download them again"
        ) from exc


def _read_tokenizer(folder: Path, config: dict[str, Any], vocab_size: int | None) -> Tokenizer:
    sp_path, json_path = folder / "tokenizer.model", folder / "tokenizer.json"
    tok_config = _optional_json(folder / "tokenizer_config.json")
    if sp_path.is_file():
        base = _read_sentencepiece(sp_path)
    elif json_path.is_file():
        base = _read_bpe_json(json_path)
    else:
        raise TokenizerError(
            f"no tokenizer in {folder}: expected tokenizer.model (SentencePiece) or "
            "tokenizer.json (byte-level BPE); copy the tokenizer files into the folder"
        )
    tokens, types, scores = base.tokens, base.types, base.scores
    # Added tokens that tokenizer_config.json declares (SentencePiece keeps them outside
    # the .model file).
    added = _added_tokens_from_config(tok_config)
    added.update(_added_tokens_json(folder / "added_tokens.json"))
    for token_id, (content, special) in sorted(added.items()):
        while len(tokens) <= token_id:
            tokens.append(_pad(len(tokens)))
            types.append(UNUSED)
            if scores is not None:
                scores.append(-1000.0)
        if special:
            tokens[token_id], types[token_id] = content.encode(), CONTROL
        else:
            # A user-defined SentencePiece token is matched as raw text: undo the space marker.
            text = content.replace("\u2581", " ") if base.model == "llama" else content
            tokens[token_id], types[token_id] = text.encode(), USER_DEFINED
        if scores is not None:
            scores[token_id] = -1000.0
    if vocab_size is not None:
        if len(tokens) > vocab_size:
            raise TokenizerError(
                f"the tokenizer defines {len(tokens)} tokens but config.json vocab_size is "
                f"{vocab_size}; the tokenizer does not belong to these weights"
            )
        while len(tokens) < vocab_size:
            tokens.append(_pad(len(tokens)))
            types.append(UNUSED)
            if scores is not None:
                scores.append(-1000.0)
    ids = {t: i for i, t in enumerate(tokens) if types[i] != UNUSED}
    special_ids = _special_ids(folder, tok_config, config, ids, base.special_ids, len(tokens))
    add_bos, add_eos = _add_bos_eos(tok_config, base, tokens, special_ids)
    add_space_prefix = base.add_space_prefix
    if isinstance(tok_config.get("add_prefix_space"), bool) and base.model == "llama":
        add_space_prefix = tok_config["add_prefix_space"]
    default_template, named = _chat_templates(folder, tok_config)
    return Tokenizer(
        model=base.model,
        pre=base.pre,
        tokens=tokens,
        token_types=types,
        scores=scores,
        merges=base.merges,
        special_ids=special_ids,
        add_bos=add_bos,
        add_eos=add_eos,
        add_space_prefix=add_space_prefix,
        chat_template=default_template,
        named_chat_templates=named,
        source=base.source,
    )


def add_tokenizer(writer: gguf.GGUFWriter, tok: Tokenizer) -> None:
    """Write ``tok`` as ``tokenizer.*`` keys."""
    writer.add_tokenizer_model(tok.model)
    writer.add_tokenizer_pre(tok.pre)
    writer.add_token_list(tok.tokens)
    if tok.scores is not None:
        writer.add_token_scores(tok.scores)
    writer.add_token_types(tok.token_types)
    if tok.merges is not None:
        writer.add_token_merges(tok.merges)
    for kind, token_id in tok.special_ids.items():
        writer.add_uint32(f"tokenizer.ggml.{_GGUF_SPECIAL_KEY[kind]}", token_id)
    if tok.add_bos is not None:
        writer.add_add_bos_token(tok.add_bos)
    if tok.add_eos is not None:
        writer.add_add_eos_token(tok.add_eos)
    if tok.add_space_prefix is not None:
        writer.add_add_space_prefix(tok.add_space_prefix)
    if tok.chat_template is not None:
        writer.add_string("tokenizer.chat_template", tok.chat_template)
    for name, template in tok.named_chat_templates.items():
        writer.add_string(f"tokenizer.chat_template.{name}", template)


_GGUF_SPECIAL_KEY = {
    "bos": "bos_token_id",
    "eos": "eos_token_id",
    "unk": "unknown_token_id",
    "pad": "padding_token_id",
}


@dataclass
class _Base:
    model: str
    pre: str
    tokens: list[bytes]
    types: list[int]
    scores: list[float] | None
    merges: list[bytes] | None
    special_ids: dict[str, int]
    add_space_prefix: bool | None
    post_template: list[str] | None  # tokenizer.json TemplateProcessing "single", as names
    source: str


def _pad(token_id: int) -> bytes:
    return f"[PAD{token_id}]".encode()


def _optional_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


# -- tokenizer.json (byte-level BPE) ------------------------------------------------------


def _read_bpe_json(path: Path) -> _Base:
    data = read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else None
        raise TokenizerError(
            f"{path}: tokenizer model type {kind!r} is not supported; this converter reads "
            "byte-level BPE tokenizer.json files or SentencePiece tokenizer.model files"
        )
    if not _has_type(data.get("pre_tokenizer"), "ByteLevel"):
        raise TokenizerError(
            f"{path}: a BPE tokenizer without a ByteLevel pre-tokenizer (SentencePiece style, "
            "byte_fallback) is read from tokenizer.model; put tokenizer.model in the folder"
        )
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise TokenizerError(f"{path}: model.vocab is missing or empty")
    added = data.get("added_tokens") or []
    n = max([*vocab.values(), *(int(a["id"]) for a in added)]) + 1
    tokens = [_pad(i) for i in range(n)]
    types = [UNUSED] * n
    for text, token_id in vocab.items():
        tokens[token_id], types[token_id] = text.encode(), NORMAL
    for entry in added:
        token_id = int(entry["id"])
        tokens[token_id] = str(entry["content"]).encode()
        types[token_id] = CONTROL if entry.get("special") else USER_DEFINED
    merges = [
        (m if isinstance(m, str) else " ".join(m)).encode() for m in model.get("merges") or []
    ]
    return _Base(
        model="gpt2",
        pre=_pre_tokenizer_name(path, data.get("pre_tokenizer")),
        tokens=tokens,
        types=types,
        scores=None,
        merges=merges,
        special_ids={},
        add_space_prefix=None,
        post_template=_post_template(data.get("post_processor")),
        source=path.name,
    )


def _has_type(node: Any, kind: str) -> bool:
    if not isinstance(node, dict):
        return False
    if node.get("type") == kind:
        return True
    return any(_has_type(n, kind) for n in node.get("pretokenizers") or [])


def _pre_tokenizer_name(path: Path, node: Any) -> str:
    regexes = []

    def walk(n: Any) -> None:
        if not isinstance(n, dict):
            return
        if n.get("type") == "Split" and isinstance(n.get("pattern"), dict):
            regexes.append(n["pattern"].get("Regex"))
        elif n.get("type") == "ByteLevel" and n.get("use_regex", True):
            regexes.append(_GPT2_REGEX)
        for child in n.get("pretokenizers") or []:
            walk(child)

    walk(node)
    if len(regexes) == 1 and regexes[0] in KNOWN_PRE_TOKENIZERS:
        return KNOWN_PRE_TOKENIZERS[regexes[0]]
    raise TokenizerError(
        f"{path}: the pre-tokenizer (split regex {regexes!r}) is not one this converter "
        f"knows; known: {', '.join(sorted(set(KNOWN_PRE_TOKENIZERS.values())))} "
        "(converting it under a wrong name would tokenize text differently)"
    )


def _post_template(node: Any) -> list[str] | None:
    """The TemplateProcessing "single" template as item names ("$A" for the text)."""
    if not isinstance(node, dict):
        return None
    if node.get("type") == "Sequence":
        for child in node.get("processors") or []:
            found = _post_template(child)
            if found is not None:
                return found
        return None
    if node.get("type") != "TemplateProcessing":
        return None
    items = []
    for item in node.get("single") or []:
        if "SpecialToken" in item:
            items.append(str(item["SpecialToken"]["id"]))
        else:
            items.append("$A")
    return items


# -- tokenizer.model (SentencePiece protobuf) ---------------------------------------------


def _read_sentencepiece(path: Path) -> _Base:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
    tokens, types, scores = [], [], []
    trainer: dict[int, int] = {}
    add_dummy_prefix = True  # the protobuf default
    try:
        for number, value in _proto_fields(data):
            if number == 1 and isinstance(value, bytes):
                piece, score, kind = b"", 0.0, NORMAL
                for n2, v2 in _proto_fields(value):
                    if n2 == 1 and isinstance(v2, bytes):
                        piece = v2
                    elif n2 == 2 and isinstance(v2, bytes) and len(v2) == 4:
                        (score,) = struct.unpack("<f", v2)
                    elif n2 == 3 and isinstance(v2, int):
                        kind = v2
                tokens.append(piece)
                scores.append(score)
                types.append(
                    kind
                    if kind in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE)
                    else NORMAL
                )
            elif number == 2 and isinstance(value, bytes):
                for n2, v2 in _proto_fields(value):
                    if n2 in (3, 40, 41, 42, 43) and isinstance(v2, int):
                        trainer[n2] = v2 - (1 << 64) if v2 >= 1 << 63 else v2
            elif number == 3 and isinstance(value, bytes):
                for n2, v2 in _proto_fields(value):
                    if n2 == 3 and isinstance(v2, int):
                        add_dummy_prefix = bool(v2)
    except (ValueError, struct.error, IndexError) as exc:
        raise TokenizerError(f"{path} is not a SentencePiece model ({exc})") from exc
    if not tokens:
        raise TokenizerError(f"{path} holds no SentencePiece pieces; download it again")
    model_type = trainer.get(3, 1)
    if model_type != _SPM_BPE:
        names = {1: "UNIGRAM", 2: "BPE", 3: "WORD", 4: "CHAR"}
        raise TokenizerError(
            f"{path}: SentencePiece model type {names.get(model_type, model_type)} is not "
            "supported; llama.cpp's SentencePiece tokenizer implements the BPE kind"
        )
    special = {}
    for kind, number, default in (("unk", 40, 0), ("bos", 41, 1), ("eos", 42, 2), ("pad", 43, -1)):
        token_id = trainer.get(number, default)
        if 0 <= token_id < len(tokens):
            special[kind] = token_id
    return _Base(
        model="llama",
        pre="default",
        tokens=tokens,
        types=types,
        scores=scores,
        merges=None,
        special_ids=special,
        add_space_prefix=add_dummy_prefix,
        post_template=None,
        source=path.name,
    )


def _proto_fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) of one protobuf message: ints for varints, bytes otherwise."""
    out: list[tuple[int, int | bytes]] = []
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            out.append((number, value))
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise ValueError("a field runs past the end of the message")
            out.append((number, buf[pos : pos + length]))
            pos += length
        elif wire == 5:
            out.append((number, buf[pos : pos + 4]))
            pos += 4
        elif wire == 1:
            out.append((number, buf[pos : pos + 8]))
            pos += 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    if pos != end:
        raise ValueError("the message ends inside a field")
    return out


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


# -- special tokens, add_bos/eos, chat template -------------------------------------------


def _added_tokens_from_config(tok_config: dict[str, Any]) -> dict[int, tuple[str, bool]]:
    decoder = tok_config.get("added_tokens_decoder")
    if not isinstance(decoder, dict):
        return {}
    out = {}
    for key, entry in decoder.items():
        if isinstance(entry, dict) and "content" in entry:
            out[int(key)] = (str(entry["content"]), bool(entry.get("special")))
    return out


def _added_tokens_json(path: Path) -> dict[int, tuple[str, bool]]:
    data = _optional_json(path)
    return {int(token_id): (str(text), False) for text, token_id in data.items()}


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _special_ids(
    folder: Path,
    tok_config: dict[str, Any],
    config: dict[str, Any],
    ids: dict[bytes, int],
    defaults: dict[str, int],
    n_tokens: int,
) -> dict[str, int]:
    special_map = _optional_json(folder / "special_tokens_map.json")
    out = {}
    for kind in _SPECIAL_KINDS:
        token_id = None
        for source in (tok_config, special_map):
            text = _token_text(source.get(f"{kind}_token"))
            if text is not None and text.encode() in ids:
                token_id = ids[text.encode()]
                break
        if token_id is None:
            value = config.get(f"{kind}_token_id")
            if isinstance(value, list) and value:
                value = value[0]
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n_tokens:
                token_id = value
        if token_id is None:
            token_id = defaults.get(kind)
        if token_id is not None:
            out[kind] = token_id
    return out


def _add_bos_eos(
    tok_config: dict[str, Any], base: _Base, tokens: list[bytes], special: dict[str, int]
) -> tuple[bool | None, bool | None]:
    add_bos = tok_config.get("add_bos_token")
    add_eos = tok_config.get("add_eos_token")
    template = base.post_template
    if template is not None:
        names = [t.encode() for t in template]
        if not isinstance(add_bos, bool):
            add_bos = bool(
                names
                and names[0] != b"$A"
                and "bos" in special
                and tokens[special["bos"]] == names[0]
            )
        if not isinstance(add_eos, bool):
            add_eos = bool(
                names
                and names[-1] != b"$A"
                and "eos" in special
                and tokens[special["eos"]] == names[-1]
            )
    if not isinstance(add_bos, bool):
        # SentencePiece Llama tokenizers add BOS by default; byte-level BPE ones do not.
        add_bos = base.model == "llama"
    if not isinstance(add_eos, bool):
        add_eos = False
    return add_bos, add_eos


def _chat_templates(folder: Path, tok_config: dict[str, Any]) -> tuple[str | None, dict[str, str]]:
    value: Any = tok_config.get("chat_template")
    jinja = folder / "chat_template.jinja"
    if value is None and jinja.is_file():
        try:
            value = jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"cannot read {jinja}: {exc}") from exc
    if value is None:
        value = _optional_json(folder / "chat_template.json").get("chat_template")
    if value is None:
        return None, {}
    if isinstance(value, str):
        return value, {}
    if isinstance(value, list):
        named = {}
        default = None
        for entry in value:
            if not isinstance(entry, dict) or not isinstance(entry.get("template"), str):
                continue
            name = str(entry.get("name", "default"))
            if name == "default":
                default = entry["template"]
            else:
                named[name] = entry["template"]
        return default, named
    raise CheckpointError(
        f"{folder / 'tokenizer_config.json'}: chat_template is neither a string nor a list of "
        "{name, template} objects"
    )
