"""Chat memory: a fact said in an early turn of a chat, asked many turns later.

A :class:`ChatMemoryCase` is a multi-turn conversation rendered by the model's own chat
template. One user turn states four facts about the user (a name, a number, a place,
a preference); the other turns carry unrelated material: pasted documents, pasted
code and small questions, each followed by a canned assistant reply, so every row sees
exactly the same conversation. The last user turn asks about one of the four facts.

Material (none of it used by the other tasks of the suite, see ``texts`` and
``tasks``): the docstrings of standard-library modules (prose, always available),
their source code, and the licence texts a Debian system keeps under
``/usr/share/common-licenses`` (or ``$EDGEMERGE_LICENSES_DIR``; skipped where missing).
The ``dev`` and ``confirm`` splits draw from disjoint documents and from different seeds.

Scoring (:func:`run_chat_memory`) drives an ``edgemerge.Llama`` the way ``edgemerge
chat`` does: one ``create_chat_completion`` call per user turn, the conversation so
far as its messages (for a base model without a chat template, Gemma 3 270M as
shipped, one completion of the chat's User/Assistant transcript instead, as the chat
runs it), so llama-cpp-python's prefix reuse feeds only the new turn and a
merging cache holds its budget the whole time. Feeding turns generate one token, which
is dropped: the canned reply takes its place. The question is answered greedily
(correct when the answer occurs in the reply, case-insensitively); then the cache is
rewound to the end of the question and the answer's tokens are teacher-forced one at
a time, giving their mean NLL. One prefill per case and row.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgemerge.evaluation.texts import (
    FidelityInputError,
    docstring_prose,
    licence,
    stdlib_file,
)

Split = Literal["dev", "confirm"]
SPLITS: tuple[str, ...] = ("dev", "confirm")
# Seeds of the two splits never meet: case i of split s draws from
# default_rng(_SPLIT_SEED[s] + 1000 * seed + i).
_SPLIT_SEED = {"dev": 1_000_003, "confirm": 2_000_029}
DEFAULT_LENGTHS: tuple[int, ...] = (2048, 4096, 8192)
MAX_NEW_TOKENS = 24
SYSTEM_PROMPT = "You are a helpful assistant."


@dataclass(frozen=True)
class _Material:
    """The documents of one split: prose (docstrings, licences) and code."""

    prose_modules: tuple[str, ...]
    licences: tuple[str, ...]
    code_modules: tuple[str, ...]


_MATERIAL: dict[str, _Material] = {
    "dev": _Material(
        prose_modules=("difflib.py", "statistics.py", "heapq.py", "textwrap.py"),
        licences=("GPL-2", "CC0-1.0", "BSD"),
        code_modules=("calendar.py", "fractions.py", "csv.py", "string.py"),
    ),
    "confirm": _Material(
        prose_modules=("doctest.py", "random.py", "pickle.py", "queue.py"),
        licences=("LGPL-3", "MPL-1.1", "GFDL-1.3"),
        code_modules=("pprint.py", "gettext.py", "sched.py", "smtplib.py"),
    ),
}

# ------------------------------------------------------------------------------ facts

NAMES = (
    "Ingrid", "Tobias", "Marisol", "Anwen", "Kasimir", "Oksana", "Thaddeus", "Ysolde",
    "Leocadia", "Bartholomew", "Florentyna", "Ignatius", "Rosalind", "Evander", "Philippa",
    "Cosimo", "Henrietta", "Lysander", "Wilhelmina", "Peregrine",
)  # fmt: skip
RELATIONS = (
    "sister", "brother", "dog", "cat", "manager", "neighbour", "best friend", "landlord",
    "dentist", "goldfish",
)  # fmt: skip
PLACES = (
    "Ljubljana", "Valparaiso", "Dunedin", "Trondheim", "Bratislava", "Windhoek", "Tbilisi",
    "Reykjavik", "Ushuaia", "Galway", "Tartu", "Zanzibar", "Hobart", "Cuenca", "Bergamo",
    "Plovdiv", "Kotor", "Arequipa",
)  # fmt: skip
PLACE_FACTS = (
    ("I grew up in {}.", "Where did I grow up?", "the town"),
    ("I am flying to {} next month.", "Where am I flying to next month?", "the place"),
    ("My parents live in {}.", "Where do my parents live?", "the place"),
    ("I studied in {}.", "Where did I study?", "the place"),
)
NUMBER_FACTS = (
    ("The code for my bike lock is {}.", "What is the code for my bike lock?"),
    ("My locker number at the gym is {}.", "What is my locker number at the gym?"),
    ("My apartment number is {}.", "What is my apartment number?"),
    ("The PIN of my office door is {}.", "What is the PIN of my office door?"),
)
PREFERENCES = (
    ("fruit", ("apricot", "persimmon", "gooseberry", "lychee", "quince", "rhubarb", "kumquat")),
    ("colour", ("teal", "maroon", "ochre", "lavender", "turquoise", "crimson", "olive")),
    ("tea", ("oolong", "rooibos", "sencha", "darjeeling", "chamomile", "earl grey")),
    ("board game", ("chess", "backgammon", "scrabble", "mahjong", "go", "checkers")),
)
FACT_KINDS = ("name", "number", "place", "preference")


@dataclass(frozen=True)
class Fact:
    """One fact of the facts turn: how it is said, how it is asked, the answer."""

    kind: str
    statement: str
    question: str
    answer: str


@dataclass(frozen=True)
class ChatMemoryCase:
    """One conversation and its question.

    Attributes:
        split: ``"dev"`` or ``"confirm"``.
        label: e.g. ``"chat_memory dev len=4096 depth=31% #2"``.
        messages: the conversation before the question: a system message, then user
            and assistant turns alternating, ending with an assistant turn.
        question: the last user turn, asking about ``answer``.
        answer: the fact asked for (a name, digits, a place or a word).
        facts: all four facts of the facts turn, the asked one included.
        fact_turn: index into ``messages`` of the user turn that states the facts.
        depth: share of the conversation's tokens (as counted when it was built) that
            come before the facts turn.
        length: the requested length in tokens.
        n_tokens: tokens of the messages and question as counted when built (the
            template adds a few per turn).
        seed: the generator seed the case was drawn from.
    """

    split: str
    label: str
    messages: tuple[dict[str, str], ...]
    question: str
    answer: str
    facts: tuple[Fact, ...]
    fact_turn: int
    depth: float
    length: int
    n_tokens: int
    seed: int
    meta: dict[str, object] = field(default_factory=dict)

    def conversation(self) -> list[dict[str, str]]:
        """The messages and the question: what the last chat call receives."""
        return [dict(m) for m in self.messages] + [{"role": "user", "content": self.question}]


def _facts(rng: np.random.Generator) -> list[Fact]:
    """One fact of each kind, in a random order."""
    relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
    name = NAMES[int(rng.integers(len(NAMES)))]
    number = str(int(rng.integers(1000, 10_000)))
    say_num, ask_num = NUMBER_FACTS[int(rng.integers(len(NUMBER_FACTS)))]
    place = PLACES[int(rng.integers(len(PLACES)))]
    say_place, ask_place, _ = PLACE_FACTS[int(rng.integers(len(PLACE_FACTS)))]
    thing, choices = PREFERENCES[int(rng.integers(len(PREFERENCES)))]
    liked = choices[int(rng.integers(len(choices)))]
    facts = [
        Fact(
            "name",
            f"My {relation}'s name is {name}.",
            f"What is my {relation}'s name?",
            name,
        ),
        Fact("number", say_num.format(number), ask_num, number),
        Fact("place", say_place.format(place), ask_place, place),
        Fact(
            "preference",
            f"My favourite {thing} is {liked}.",
            f"What is my favourite {thing}?",
            liked,
        ),
    ]
    order = rng.permutation(len(facts))
    return [facts[int(i)] for i in order]


# --------------------------------------------------------------------------- material

_PARAGRAPH = re.compile(r"\n[ \t]*\n")
_DEF = re.compile(r"^\s*(?:async\s+)?(def|class)\s+([A-Za-z_][A-Za-z0-9_]*)", re.M)


@dataclass
class _Pool:
    """The split's texts, loaded on first use: prose paragraphs and code files."""

    split: str
    prose: list[tuple[str, list[str]]] = field(default_factory=list)  # (label, paragraphs)
    code: list[tuple[str, list[str]]] = field(default_factory=list)  # (module, lines)
    missing: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, split: str) -> _Pool:
        material = _MATERIAL[split]
        pool = cls(split)
        for name in material.prose_modules:
            path = stdlib_file(name)
            if not path.is_file():
                pool.missing.append(str(path))
                continue
            paragraphs = [p.strip() for p in _PARAGRAPH.split(docstring_prose(path)) if p.strip()]
            if paragraphs:
                pool.prose.append((f"documentation of Python's {name[:-3]} module", paragraphs))
        for name in material.licences:
            doc = licence(name)
            if not doc.exists():
                pool.missing.append(doc.where())
                continue
            text = doc.read().replace("\r\n", "\n").replace("\f", "")
            paragraphs = [p.strip() for p in _PARAGRAPH.split(text) if p.strip()]
            if paragraphs:
                pool.prose.append((f"the {name} licence", paragraphs))
        for name in material.code_modules:
            path = stdlib_file(name)
            if not path.is_file():
                pool.missing.append(str(path))
                continue
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            if len(lines) > 40:
                pool.code.append((name[:-3], lines))
        if not pool.prose or not pool.code:
            raise FidelityInputError(
                f"chat_memory {split} split: no {'prose' if not pool.prose else 'code'} "
                f"material found (missing: {', '.join(pool.missing) or 'none'}); it needs "
                "CPython's standard-library sources"
            )
        return pool

    def text(self) -> str:
        """All the split's filler text (to check that no answer occurs in it)."""
        prose = "\n".join(p for _, paragraphs in self.prose for p in paragraphs)
        return prose + "\n".join(line for _, lines in self.code for line in lines)


_POOLS: dict[str, _Pool] = {}


def _pool(split: str) -> _Pool:
    if split not in _POOLS:
        _POOLS[split] = _Pool.load(split)
    return _POOLS[split]


DOC_INTROS = (
    "Here is part of {} that I am reading:",
    "I pasted a passage from {} below, keep it in mind:",
    "Can you look over this excerpt from {}?",
)
DOC_REPLIES = (
    "Thanks, I have read the passage. Let me know what you would like to do with it.",
    "Got it. It is a fairly dense text; ask me anything about it.",
    "I have gone through the excerpt. Do you want a summary or a specific detail?",
)
CODE_INTROS = (
    "Here is some Python code from the {} module:",
    "What does this code from {} do?",
    "I am reviewing this snippet of {}:",
)


def _doc_turn(pool: _Pool, rng: np.random.Generator, n_chars: int) -> tuple[str, str]:
    label, paragraphs = pool.prose[int(rng.integers(len(pool.prose)))]
    start = int(rng.integers(len(paragraphs)))
    taken: list[str] = []
    size = 0
    for i in range(len(paragraphs)):
        para = paragraphs[(start + i) % len(paragraphs)]
        if size + len(para) > n_chars and taken:
            # the last paragraph is cut at a line break, so excerpts keep their size
            cut = para.rfind("\n", 0, n_chars - size)
            if cut > 0:
                taken.append(para[:cut])
            break
        taken.append(para)
        size += len(para) + 2
        if size >= n_chars:
            break
    intro = DOC_INTROS[int(rng.integers(len(DOC_INTROS)))].format(label)
    reply = DOC_REPLIES[int(rng.integers(len(DOC_REPLIES)))]
    return f"{intro}\n\n" + "\n\n".join(taken), reply


def _code_turn(pool: _Pool, rng: np.random.Generator, n_chars: int) -> tuple[str, str]:
    module, lines = pool.code[int(rng.integers(len(pool.code)))]
    n_lines = max(10, min(len(lines) - 1, n_chars // 32))
    start = int(rng.integers(0, len(lines) - n_lines + 1))
    snippet = "\n".join(lines[start : start + n_lines])
    names = [name for _, name in _DEF.findall(snippet)]
    if names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        reply = f"This part of {module} defines {shown}."
    else:
        reply = f"This is the body of a function in {module}; it defines no new names."
    intro = CODE_INTROS[int(rng.integers(len(CODE_INTROS)))].format(module)
    return f"{intro}\n\n```python\n{snippet}\n```", reply


def _question_turn(rng: np.random.Generator) -> tuple[str, str]:
    a, b = int(rng.integers(12, 99)), int(rng.integers(3, 30))
    kind = int(rng.integers(3))
    if kind == 0:
        return f"Unrelated, but what is {a} times {b}?", f"{a} times {b} is {a * b}."
    if kind == 1:
        return (
            f"How many minutes are there in {b} hours?",
            f"There are {60 * b} minutes in {b} hours.",
        )
    return f"What is {a * b} divided by {b}?", f"{a * b} divided by {b} is {a}."


# ------------------------------------------------------------------------------ cases

Tokenize = Callable[[str], Sequence[int]]


def _approx_tokens(text: str) -> int:
    """~4 characters per token: the default when no tokenizer is given."""
    return max(1, math.ceil(len(text) / 4))


def check_case_args(split: str, n: object, seed: object) -> None:
    """The arguments every case builder takes: a known split, ``n >= 1``, ``seed >= 0``.

    Raises:
        FidelityInputError: naming the argument and what it must be.
    """
    if split not in SPLITS:
        raise FidelityInputError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise FidelityInputError(f"n must be an integer >= 1 (cases per length), got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise FidelityInputError(f"seed must be an integer >= 0, got {seed!r}")


def cases(
    split: Split = "dev",
    n: int = 4,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    seed: int = 0,
    *,
    tokenize: Tokenize | None = None,
) -> list[ChatMemoryCase]:
    """``n`` conversations per length of ``split`` (lengths outermost), deterministic.

    Args:
        split: ``"dev"`` (tune on it) or ``"confirm"`` (report only); their documents
            and seeds are disjoint.
        n: cases per length. Case ``j`` of a length puts the facts at depth
            ``(j + u) / n`` of the conversation (``u`` uniform in [0.1, 0.9]), and asks
            about fact kind ``j mod 4`` (name, number, place, preference).
        lengths: approximate conversation lengths in tokens (>= 512 each).
        seed: shifts every case's generator; the same seed gives the same cases.
        tokenize: counts tokens while building (the model's tokenizer makes lengths
            and depths exact up to the template's few tokens per turn); default ~4
            characters per token.

    Raises:
        FidelityInputError: a bad argument, or the split's material is missing.
    """
    check_case_args(split, n, seed)
    if isinstance(lengths, (int, np.integer)) or not lengths:
        raise FidelityInputError(f"lengths must be a non-empty sequence, got {lengths!r}")
    for length in lengths:
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 512:
            raise FidelityInputError(f"each length must be an integer >= 512, got {length!r}")
    count = (lambda text: len(tokenize(text))) if tokenize is not None else _approx_tokens
    pool = _pool(split)
    filler_text = pool.text().lower()
    out = []
    for li, length in enumerate(lengths):
        for j in range(n):
            case_seed = _SPLIT_SEED[split] + 1000 * seed + li * n + j
            rng = np.random.default_rng(case_seed)
            depth = (j + float(rng.uniform(0.1, 0.9))) / n
            out.append(
                _build(pool, filler_text, rng, split, int(length), depth, j, case_seed, count)
            )
    return out


def _build(
    pool: _Pool,
    filler_text: str,
    rng: np.random.Generator,
    split: str,
    length: int,
    depth: float,
    index: int,
    case_seed: int,
    count: Callable[[str], int],
) -> ChatMemoryCase:
    # Facts whose answer occurs in the filler would be answerable without memory.
    for _ in range(100):
        facts = _facts(rng)
        if not any(f.answer.lower() in filler_text for f in facts):
            break
    asked = next(f for f in facts if f.kind == FACT_KINDS[index % len(FACT_KINDS)])
    facts_text = (
        "Before we go on, a few things about me. "
        + " ".join(f.statement for f in facts)
        + " Please remember them."
    )
    facts_pair = (facts_text, "Noted, I will remember that.")
    question = f"{asked.question} Reply with just the {_answer_noun(asked)}."
    fixed = count(SYSTEM_PROMPT) + count(facts_text) + count(facts_pair[1]) + count(question)
    # Filler turns until the length is reached: mostly documents and code, some questions.
    fillers: list[tuple[str, str]] = []
    sizes: list[int] = []
    total = fixed
    while total < length:
        room = length - total
        kind = int(rng.choice(3, p=(0.45, 0.4, 0.15)))
        n_chars = int(rng.integers(1200, 4000))
        n_chars = min(n_chars, max(400, room * 3))  # the last turn only fills what is left
        if kind == 0:
            pair = _doc_turn(pool, rng, n_chars)
        elif kind == 1:
            pair = _code_turn(pool, rng, n_chars)
        else:
            pair = _question_turn(rng)
        size = count(pair[0]) + count(pair[1])
        fillers.append(pair)
        sizes.append(size)
        total += size
    # The facts turn goes at the filler boundary nearest the depth.
    before = np.concatenate([[0], np.cumsum(sizes)])
    at = int(np.argmin(np.abs(before - depth * total)))
    turns = fillers[:at] + [facts_pair] + fillers[at:]
    messages: list[dict[str, str]] = [{"role": "system", "content": SYSTEM_PROMPT}]
    for user, assistant in turns:
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": assistant})
    placed = float(before[at] / total)
    return ChatMemoryCase(
        split=split,
        label=f"chat_memory {split} len={length} depth={placed:.0%} #{index}",
        messages=tuple(messages),
        question=question,
        answer=asked.answer,
        facts=tuple(facts),
        fact_turn=1 + 2 * at,
        depth=placed,
        length=length,
        n_tokens=int(total),
        seed=case_seed,
        meta={"kind": asked.kind, "turns": len(turns) + 1},
    )


def _answer_noun(fact: Fact) -> str:
    return {"name": "name", "number": "number", "place": "place"}.get(fact.kind, "answer")


# ---------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class CaseResult:
    """One row on one case of a product-path bench (chat memory or retrieval).

    Attributes:
        correct: the share of the case's questions whose answer occurs in the greedy
            reply (case-insensitive); a chat-memory case asks one, so 0.0 or 1.0.
        answer_nll: mean NLL (nats/token) of the answer's tokens, teacher forced right
            after the question (a mean over the questions where there are several).
        reply: the greedy reply (replies joined by " | " where there are several).
        prompt_tokens: logical tokens of the (first) question's prompt, context included.
        peak_cells: the most KV cells the sequence held after any turn.
        final_cells: KV cells when the question had been read.
        kv_bytes: ``final_cells`` times the KV bytes of one cell.
        decode_tok_s: single-token decode steps per second at the conversation's end
            (the timed steps after the answer; NaN when none were asked for).
    """

    correct: float
    answer_nll: float
    reply: str
    prompt_tokens: int
    peak_cells: int
    final_cells: int
    kv_bytes: int
    decode_tok_s: float = math.nan


def forced_answer_nll(llm: Any, n_prompt: int, target: Sequence[int]) -> tuple[list[float], int]:
    """NLL (nats) of each ``target`` token, teacher forced right after the prompt's
    ``n_prompt`` tokens, and the cells the cache held once the prompt was read.

    Rewinds ``llm`` to the prompt's last token and evaluates it and the target one
    token per decode, so that each step's logits are the only ones llama.cpp keeps.
    """
    last = int(llm.input_ids[n_prompt - 1])
    llm.n_tokens = n_prompt - 1
    nlls, final_cells = [], 0
    for i, token in enumerate([last, *target[:-1]]):
        llm.eval([int(token)])
        if i == 0:
            final_cells = cells_now(llm)
        nlls.append(token_nll(last_logits(llm), int(target[i])))
    return nlls, final_cells


def cells_now(llm: Any) -> int:
    """Cells the cache of ``llm`` holds now (0 before the first evaluation)."""
    from edgemerge.native import kvcells

    return len(kvcells.list_cells(llm)) if llm.n_tokens else 0


def bytes_per_cell(llm: Any) -> int:
    """K and V bytes of one cell over every layer of ``llm``'s cache."""
    from edgemerge.native import kvmerge
    from edgemerge.reference.ggml_quants import row_bytes

    shape = kvmerge.kv_shape(llm)
    params = llm.context_params
    return shape.n_layer * (
        row_bytes(int(params.type_k), shape.n_head_kv * shape.head_dim_k)
        + row_bytes(int(params.type_v), shape.n_head_kv * shape.head_dim_v)
    )


def last_logits(llm: Any) -> np.ndarray:
    """float64 ``[n_vocab]``: the logits of the last evaluated token."""
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(np.float64)


def token_nll(logits: np.ndarray, target: int) -> float:
    """``-log softmax(logits)[target]`` in nats."""
    top = float(logits.max())
    return float(top + math.log(np.exp(logits - top).sum()) - logits[target])


def normalise(text: str) -> str:
    """Lower case, whitespace collapsed: what the containment check compares."""
    return " ".join(text.lower().split())


def run_chat_memory(
    llm: Any,
    case: ChatMemoryCase,
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    decode_steps: int = 0,
) -> CaseResult:
    """Feed ``case`` turn by turn into ``llm`` as ``edgemerge chat`` does, then score.

    Args:
        llm: an ``edgemerge.Llama`` (merging or not) or any ``llama_cpp.Llama`` on the
            patched library, freshly built or reset; its cache must hold what its
            settings keep (the whole conversation when it does not merge).
        case: the conversation.
        max_new_tokens: longest greedy reply to the question.
        decode_steps: after scoring, this many more single-token evaluations (the
            answer's tokens again) are timed for ``decode_tok_s``.

    Raises:
        ValueError: from llama-cpp-python when the conversation does not fit the
            context; SettingsError from a merging Llama whose budget cannot hold a turn.
    """
    from edgemerge.chat import TRANSCRIPT, TRANSCRIPT_STOP, chat_mode, transcript

    # the chat's own rule: the GGUF's template, or a plain transcript for a base model
    as_transcript = chat_mode(llm) == TRANSCRIPT

    def reply_to(history: list[dict[str, str]], max_tokens: int) -> tuple[str, int]:
        greedy = {"max_tokens": max_tokens, "temperature": 0.0, "repeat_penalty": 1.0}
        if as_transcript:
            out = llm.create_completion(transcript(history), stop=TRANSCRIPT_STOP, **greedy)
            text = out["choices"][0]["text"]
        else:
            out = llm.create_chat_completion(messages=history, **greedy)
            text = out["choices"][0]["message"]["content"]
        return (text or "").strip(), int(out["usage"]["prompt_tokens"])

    history: list[dict[str, str]] = []
    peak = 0
    for message in case.messages:
        history.append(dict(message))
        if message["role"] != "user":
            continue
        # one call per user turn, as the chat makes it; the canned reply replaces the
        # token generated here (never evaluated) in the next call's prompt
        reply_to(history, 1)
        peak = max(peak, cells_now(llm))
    history.append({"role": "user", "content": case.question})
    reply, n_prompt = reply_to(history, max_new_tokens)
    correct = normalise(case.answer) in normalise(reply)
    target = [int(t) for t in llm.tokenize(case.answer.encode(), add_bos=False, special=False)]
    nlls, final_cells = forced_answer_nll(llm, n_prompt, target)
    peak = max(peak, final_cells)
    decode_tok_s = math.nan
    if decode_steps > 0:
        start = time.perf_counter()
        for i in range(decode_steps):
            llm.eval([target[i % len(target)]])
        decode_tok_s = decode_steps / (time.perf_counter() - start)
    return CaseResult(
        correct=float(correct),
        answer_nll=float(np.mean(nlls)),
        reply=reply,
        prompt_tokens=n_prompt,
        peak_cells=peak,
        final_cells=final_cells,
        kv_bytes=final_cells * bytes_per_cell(llm),
        decode_tok_s=decode_tok_s,
    )


def score_chat_memory(
    make_llm: Callable[[], Any], case: ChatMemoryCase, *, max_new_tokens: int = MAX_NEW_TOKENS
) -> tuple[bool, float]:
    """``(correct, answer_nll)`` of a fresh ``make_llm()`` on ``case`` (see
    :func:`run_chat_memory`); the Llama is closed afterwards."""
    llm = make_llm()
    try:
        result = run_chat_memory(llm, case, max_new_tokens=max_new_tokens)
    finally:
        llm.close()
    return result.correct, result.answer_nll


def llm_factory(
    model: str | Path,
    *,
    merge: Any = None,
    cache_type: str = "f16",
    n_ctx: int = 10240,
    n_batch: int = 256,
    n_threads: int | None = None,
    **kwargs: Any,
) -> Callable[[], Any]:
    """A ``make_llm`` for :func:`score_chat_memory`: a fresh ``edgemerge.Llama`` per call.

    Args:
        model: registry name or GGUF path.
        merge: any ``MergeSettings`` (None: no merging), passed through unchanged.
        cache_type: K and V cache type (``"f16"``, ``"q8_0"``, ``"q4_0"``).
        n_ctx: physical cache cells (a full row needs the whole conversation plus the
            reply; a merging row its budget plus a batch and the slack).
        n_batch: prefill chunk (the same for every row, so every row sees the same
            chunking).
        **kwargs: anything else ``edgemerge.Llama`` takes.
    """
    import os

    import edgemerge
    from edgemerge.reference.ggml_quants import ggml_type

    type_id = ggml_type(cache_type).type_id
    threads = n_threads or max(1, os.cpu_count() or 1)
    options: dict[str, Any] = {
        "n_ctx": n_ctx,
        "n_batch": n_batch,
        "n_ubatch": n_batch,
        "n_threads": threads,
        "n_threads_batch": threads,
        "type_k": type_id,
        "type_v": type_id,
        "flash_attn": True,
        "verbose": False,
        **kwargs,
    }

    def make() -> Any:
        return edgemerge.Llama(model, merge=merge, **options)

    return make
