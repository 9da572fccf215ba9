"""Retrieval on the product's path: pass keys and needles asked of a streaming cache.

The suite (:mod:`edgemerge.evaluation.suite`) scores what a compressed cache keeps by
restoring its cells into a separate scoring context, so a question never reaches the
cache that merged the context, and recall cannot run there. Here each case goes through
one ``edgemerge.Llama`` as a program drives it: the context is evaluated with the budget
held from the first chunk; each question is then a prompt of its own (recall, when on,
runs at its end), answered greedily and scored with :func:`tasks.score_answer`; then the
cache is rewound to the question's last token and the answer is teacher-forced one token
per decode for its mean NLL. A case with several questions (multi-needle) asks each one
from the state the context left (saved once with the recall store, loaded again before
each later question), so no question sees another's answer.

Cases: the ``passkey``, ``niah``, ``multi_needle`` and ``repeat`` samples of
:mod:`tasks`, ``n`` per task and length, the needle (or passage) of case ``j`` at depth
``(j + u) / n`` (``u`` uniform in [0.1, 0.9]). ``repeat`` pastes a stretch of a standard-
library module into the haystack and asks for it back: its query is the passage's first
tokens, its answer the next 192 (twelve 16-token blocks), scored token for token, so a
reply that quotes it needs more of the passage than the cue's recall brings back (eight
blocks by default; ``MergeSettings.recall_every``).
The ``dev`` split builds its haystacks from the licence texts the suite uses, ``confirm``
from the bash NEWS and COMPAT files Debian ships, and each its passages from modules of
its own; the two draw from seeds the other never uses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgemerge.evaluation import chat_memory as cm
from edgemerge.evaluation import tasks
from edgemerge.evaluation.texts import (
    LICENCES,
    Document,
    FidelityInputError,
    debian_doc,
    stdlib_file,
)

TASKS: tuple[str, ...] = ("passkey", "niah", "multi_needle", "repeat")
N_NEEDLES = 4  # per multi-needle case, one question each
_FILLER: dict[str, tuple[Document, ...]] = {
    "dev": tuple(d for d in tasks.FILLER_DOCS if d.folder is LICENCES),
    "confirm": (
        debian_doc("bash/NEWS.gz", "bash NEWS (Debian doc)"),
        debian_doc("bash/COMPAT.gz", "bash COMPAT (Debian doc)"),
    ),
}
# "repeat" passages: pasted code, unlike either split's prose filler
_PASSAGES: dict[str, tuple[Document, ...]] = {
    split: tuple(Document(f"{name} (stdlib)", stdlib_file(name)) for name in names)
    for split, names in (
        ("dev", ("shutil.py", "tarfile.py", "inspect.py")),
        ("confirm", ("imaplib.py", "ftplib.py", "mailbox.py")),
    )
}
# case i of split s draws from default_rng(_SPLIT_SEED[s] + 1000 * seed + i)
_SPLIT_SEED = {"dev": 3_000_017, "confirm": 4_000_037}


@dataclass(frozen=True)
class RetrievalCase:
    """One context and the questions asked after it.

    Attributes:
        split: ``"dev"`` or ``"confirm"``.
        task: one of :data:`TASKS`.
        label: e.g. ``"niah confirm len=8192 depth=40% #1"``.
        context: int32 ``[n_tokens]``, BOS first (where the model has one).
        queries: the questions, each answered from the state the context leaves.
        length: the requested length in tokens (the context's exactly).
        n_tokens: tokens of the context: what a percentage budget is taken of.
        seed: the generator seed the case was drawn from.
    """

    split: str
    task: str
    label: str
    context: np.ndarray
    queries: tuple[tasks.Query, ...]
    length: int
    n_tokens: int
    seed: int

    @property
    def tail_tokens(self) -> int:
        """Most tokens one question adds after the context: its prompt and its answer."""
        return max(q.tokens.shape[0] + q.max_new_tokens for q in self.queries)


def cases(
    split: str,
    n: int,
    lengths: Sequence[int],
    task_names: Sequence[str] = TASKS,
    seed: int = 0,
    *,
    tokenize: Callable[[str], Sequence[int]],
    bos: Sequence[int],
) -> list[RetrievalCase]:
    """``n`` cases per task and length (tasks outermost, then lengths), deterministic.

    Raises:
        FidelityInputError: a bad argument, or the split's documents are missing.
    """
    cm.check_case_args(split, n, seed)
    unknown = [t for t in task_names if t not in TASKS]
    if unknown or not task_names:
        raise FidelityInputError(f"retrieval tasks must be among {TASKS}, got {task_names!r}")
    docs = _FILLER[split]
    out = []
    index = 0
    for task in task_names:
        for length in lengths:
            for j in range(n):
                case_seed = _SPLIT_SEED[split] + 1000 * seed + index
                index += 1
                depth = (j + float(np.random.default_rng(case_seed).uniform(0.1, 0.9))) / n
                sample = _sample(task, split, tokenize, bos, int(length), depth, case_seed, docs)
                where = f"depth={depth:.0%}" if task != "multi_needle" else f"needles={N_NEEDLES}"
                out.append(
                    RetrievalCase(
                        split,
                        task,
                        f"{task} {split} len={length} {where} #{j}",
                        sample.context,
                        sample.queries,
                        int(length),
                        int(sample.context.shape[0]),
                        case_seed,
                    )
                )
    return out


def _sample(
    task: str,
    split: str,
    tokenize: Callable[[str], Sequence[int]],
    bos: Sequence[int],
    length: int,
    depth: float,
    seed: int,
    docs: Sequence[Document],
) -> tasks.Sample:
    if task == "passkey":
        samples = tasks.passkey_samples(
            tokenize, bos, n_context=length, depths=[depth], seed=seed, filler_docs=docs
        )
    elif task == "niah":
        samples = tasks.niah_samples(
            tokenize, bos, lengths=[length], depths=[depth], seed=seed, filler_docs=docs
        )
    elif task == "repeat":
        samples = tasks.repeat_samples(
            tokenize,
            bos,
            n_context=length,
            depths=[depth],
            passage_docs=_PASSAGES[split],
            seed=seed,
            filler_docs=docs,
        )
    else:
        samples = tasks.multi_needle_samples(
            tokenize,
            bos,
            n_context=length,
            n_needles=N_NEEDLES,
            n_samples=1,
            seed=seed,
            filler_docs=docs,
        )
    return samples[0]


def run_retrieval(llm: Any, case: RetrievalCase) -> cm.CaseResult:
    """Evaluate ``case`` in ``llm`` and answer its questions (see the module docstring).

    Args:
        llm: a fresh (or reset) ``edgemerge.Llama``, merging or not, whose logical
            context holds the context and the longest question with its answer.

    Raises:
        ValueError: the case does not fit ``llm``; SettingsError from a merging Llama
            whose budget cannot hold a chunk.
    """
    llm.eval(case.context.tolist())
    peak = cm.cells_now(llm)
    saved = llm.save_state() if len(case.queries) > 1 else None
    store = llm.recall_store() if saved is not None else None
    eos = llm.token_eos()
    scores, nlls, replies = [], [], []
    final_cells = prompt_tokens = 0
    for qi, query in enumerate(case.queries):
        if qi > 0:
            llm.load_state(saved)
            if store is not None:
                llm.load_recall_store(store)
        llm.eval(query.tokens.tolist())
        n_prompt = llm.n_tokens
        prompt_tokens = prompt_tokens or n_prompt
        generated: list[int] = []
        for step in range(query.max_new_tokens):
            token = int(np.argmax(cm.last_logits(llm)))
            if token == eos:
                break
            generated.append(token)
            if step + 1 < query.max_new_tokens:
                llm.eval([token])
        peak = max(peak, cm.cells_now(llm))
        text = llm.detokenize(generated).decode("utf-8", errors="replace")
        replies.append(text.strip())
        if query.answer_tokens is not None:  # a passage quoted back, token for token
            scores.append(tasks.score_tokens(query, generated))
            target = [int(t) for t in query.answer_tokens]
        else:
            scores.append(tasks.score_answer(query, text))
            # the query ends right before the answer, which follows after a space
            target = [int(t) for t in llm.tokenize((" " + query.answer).encode(), add_bos=False)]
        answer, cells = cm.forced_answer_nll(llm, n_prompt, target)
        final_cells = max(final_cells, cells)
        nlls.append(float(np.mean(answer)))
    peak = max(peak, final_cells)
    return cm.CaseResult(
        correct=float(np.mean(scores)),
        answer_nll=float(np.mean(nlls)),
        reply=" | ".join(replies),
        prompt_tokens=prompt_tokens,
        peak_cells=peak,
        final_cells=final_cells,
        kv_bytes=final_cells * cm.bytes_per_cell(llm),
    )
