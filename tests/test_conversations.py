"""ConversationCache: one entry per conversation, on a tiny model (no server)."""

from __future__ import annotations

import pytest

from edgemerge.prefix.conversations import ConversationCache, ServedLlama


def make(path, **cache_kw):
    llm = ServedLlama(
        str(path), n_ctx=1024, n_batch=64, n_threads=1, seed=7, verbose=False, logits_all=False
    )
    llm.set_cache(ConversationCache(1 << 28, block_size=8, **cache_kw))
    return llm


def complete(llm, tokens: list[int], n: int = 4) -> list[int]:
    llm.begin_request()
    llm.create_completion(tokens, max_tokens=n, temperature=0)
    return llm.input_ids[: llm.n_tokens].tolist()


def test_a_next_turn_supersedes_the_conversations_older_entry(tiny_qwen2_path):
    llm = make(tiny_qwen2_path)
    a = list(range(1000, 1040))
    after = complete(llm, a)
    assert len(llm.cache) == 1
    # the next turn resends the history with the reply changed (re-tokenized) at its end
    complete(llm, after[: len(a)] + [7, 8, 9] + list(range(2000, 2020)))
    assert len(llm.cache) == 1 and llm.cache.superseded == 1


def test_conversations_sharing_a_prefix_keep_their_own_entries(tiny_qwen2_path):
    """Same long document, different question: the second does not repeat the first's
    whole prompt, so both stay."""
    llm = make(tiny_qwen2_path)
    doc = list(range(3000, 3060))
    complete(llm, doc + [11, 12, 13])
    complete(llm, doc + [21, 22, 23])
    assert len(llm.cache) == 2 and llm.cache.superseded == 0
    s = llm.request_stats()
    assert s.prompt_tokens_cached >= 56 and s.conversations == 2


def test_past_max_conversations_the_least_recently_used_goes(tiny_qwen2_path):
    llm = make(tiny_qwen2_path, max_conversations=2)
    first = [list(range(4000 + 100 * i, 4040 + 100 * i)) for i in range(3)]
    for tokens in first:
        complete(llm, tokens)
    kept = {tuple(llm.cache.entry_tokens(k)[:40]) for k in llm.cache._entries}
    assert kept == {tuple(first[1]), tuple(first[2])}


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="max_conversations"):
        ConversationCache(1 << 20, max_conversations=0)
