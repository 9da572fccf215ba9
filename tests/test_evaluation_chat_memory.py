"""Chat memory: the conversations, and scoring through the chat path on a tiny model.

The tiny model's answers are noise, so the scoring tests check the machinery: feeding
turn by turn through ``create_chat_completion`` leaves exactly the tokens of the whole
conversation rendered at once, the teacher-forced answer NLL equals the NLL of a
one-shot forward pass, and a merging Llama holds its budget through every turn.
"""

from __future__ import annotations

import re
from pathlib import Path

import llama_cpp  # conftest imported edgemerge first, so this is the patched libllama
import numpy as np
import pytest

from edgemerge.evaluation import chat_memory as cm
from edgemerge.evaluation.texts import FidelityInputError
from edgemerge.settings import MergeSettings


@pytest.fixture(scope="module")
def vocab(tiny_qwen2_path: Path) -> llama_cpp.Llama:
    return llama_cpp.Llama(str(tiny_qwen2_path), n_ctx=256, n_threads=2, verbose=False)


def _tokenize(llm: llama_cpp.Llama):  # noqa: ANN202
    return lambda text: llm.tokenize(text.encode(), add_bos=False, special=False)


def test_cases_are_deterministic_and_split_apart(vocab: llama_cpp.Llama) -> None:
    tok = _tokenize(vocab)
    dev = cm.cases("dev", 4, [2048], tokenize=tok)
    again = cm.cases("dev", 4, [2048], tokenize=tok)
    assert [c.messages for c in dev] == [c.messages for c in again]
    assert [c.answer for c in dev] == [c.answer for c in again]
    confirm = cm.cases("confirm", 4, [2048], tokenize=tok)
    other_seed = cm.cases("dev", 4, [2048], seed=1, tokenize=tok)
    assert [c.messages for c in dev] != [c.messages for c in other_seed]
    assert not {c.seed for c in dev} & {c.seed for c in confirm}

    def filler(cases: list[cm.ChatMemoryCase]) -> str:
        return "\n".join(
            m["content"]
            for c in cases
            for i, m in enumerate(c.messages)
            if m["role"] == "user" and i != c.fact_turn
        )

    # disjoint documents: the intro names the source, and no dev source is in confirm
    sources = {
        split: set(re.findall(r"(?:from|of) (?:the )?(\S+ (?:module|licence))", filler(cs)))
        for split, cs in (("dev", dev), ("confirm", confirm))
    }
    assert sources["dev"] and sources["confirm"]
    assert not sources["dev"] & sources["confirm"]


def test_case_structure(vocab: llama_cpp.Llama) -> None:
    tok = _tokenize(vocab)
    cases = cm.cases("dev", 4, [2048, 4096], tokenize=tok)
    assert len(cases) == 8
    assert [c.length for c in cases] == [2048] * 4 + [4096] * 4
    # one question per fact kind, in order, for every length
    assert [c.meta["kind"] for c in cases[:4]] == list(cm.FACT_KINDS)
    for case in cases:
        roles = [m["role"] for m in case.messages]
        assert roles[0] == "system"
        assert roles[1::2] == ["user"] * (len(roles) // 2)
        assert roles[2::2] == ["assistant"] * (len(roles) // 2)
        facts_turn = case.messages[case.fact_turn]["content"]
        assert len(case.facts) == 4 and {f.kind for f in case.facts} == set(cm.FACT_KINDS)
        assert all(f.statement in facts_turn for f in case.facts)
        assert case.answer in facts_turn
        # the answer is nowhere else in the conversation
        others = [m["content"] for i, m in enumerate(case.messages) if i != case.fact_turn]
        assert not any(case.answer.lower() in text.lower() for text in others)
        assert case.length * 0.9 <= case.n_tokens <= case.length * 1.15
        assert 0.0 <= case.depth < 1.0
    # the facts' depth varies within a length
    assert len({round(c.depth, 2) for c in cases[4:]}) >= 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "test"}, "split"),
        ({"n": 0}, "n must"),
        ({"lengths": []}, "lengths"),
        ({"lengths": [100]}, "length"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(FidelityInputError, match=match):
        cm.cases(**kwargs)


@pytest.fixture(scope="module")
def case(vocab: llama_cpp.Llama) -> cm.ChatMemoryCase:
    return cm.cases("confirm", 1, [1024], tokenize=_tokenize(vocab))[0]


def test_full_row_matches_one_shot(tiny_qwen2_path: Path, case: cm.ChatMemoryCase) -> None:
    make = cm.llm_factory(tiny_qwen2_path, n_ctx=2048, n_batch=64, n_threads=2)
    llm = make()
    try:
        result = cm.run_chat_memory(llm, case, max_new_tokens=4)
        fed = [int(t) for t in llm.input_ids[: result.prompt_tokens]]
    finally:
        llm.close()
    assert result.peak_cells == result.final_cells == result.prompt_tokens
    assert result.correct == (cm.normalise(case.answer) in cm.normalise(result.reply))
    # the whole conversation rendered at once gives the very tokens fed turn by turn
    one = llama_cpp.Llama(
        str(tiny_qwen2_path), n_ctx=2048, n_batch=64, n_threads=2, logits_all=True, verbose=False
    )
    try:
        one.create_chat_completion(messages=case.conversation(), max_tokens=1, temperature=0.0)
        assert [int(t) for t in one.input_ids[: len(fed)]] == fed
        answer = one.tokenize(case.answer.encode(), add_bos=False, special=False)
        one.reset()
        one.eval(fed + answer[:-1])
        logits = np.asarray(one.scores[len(fed) - 1 : len(fed) - 1 + len(answer)], np.float64)
    finally:
        one.close()
    top = logits.max(axis=1)
    nll = (
        top
        + np.log(np.exp(logits - top[:, None]).sum(axis=1))
        - logits[np.arange(len(answer)), answer]
    )
    assert result.answer_nll == pytest.approx(float(nll.mean()), abs=2e-3)
    assert cm.score_chat_memory(make, case, max_new_tokens=4) == pytest.approx(
        (result.correct, result.answer_nll), abs=2e-3
    )


def test_merging_row_holds_its_budget(tiny_qwen2_path: Path, case: cm.ChatMemoryCase) -> None:
    merge = MergeSettings(budget=320, recent=64, slack=0)
    llm = cm.llm_factory(tiny_qwen2_path, merge=merge, n_ctx=512, n_batch=64, n_threads=2)()
    try:
        result = cm.run_chat_memory(llm, case, max_new_tokens=4)
        stats = llm.merge_stats()
    finally:
        llm.close()
    assert result.prompt_tokens > 3 * merge.budget
    assert result.peak_cells <= merge.budget
    assert stats.compressions > 0 and stats.merges > 0
    assert np.isfinite(result.answer_nll) and result.answer_nll > 0
    assert result.kv_bytes == result.final_cells * stats.bytes_per_cell


def test_a_base_model_is_fed_the_chats_transcript(tmp_path: Path, case: cm.ChatMemoryCase) -> None:
    # no chat template: the chat's User/Assistant transcript, not llama-2's [INST] fallback
    from edgemerge.chat import transcript
    from edgemerge.testing.tiny_models import write_tiny_model

    path = write_tiny_model(tmp_path / "base.gguf", "qwen2", chat_template=False)
    llm = cm.llm_factory(path, n_ctx=2048, n_batch=64, n_threads=2)()
    try:
        result = cm.run_chat_memory(llm, case, max_new_tokens=4)
        fed = llm.detokenize(llm.input_ids[: result.prompt_tokens].tolist()).decode()
    finally:
        llm.close()
    assert "[INST]" not in fed
    assert fed.endswith(transcript(case.conversation()))
    assert np.isfinite(result.answer_nll)
