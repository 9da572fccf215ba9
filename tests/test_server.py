"""`edgemerge serve` against the `openai` client on localhost (tiny generated models)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi", reason="edgemerge serve needs the server extra")
openai = pytest.importorskip("openai", reason="the client tests need the openai package")
uvicorn = pytest.importorskip("uvicorn", reason="edgemerge serve needs the server extra")

from edgemerge import Llama, MergeSettings  # noqa: E402
from edgemerge.server import ServeConfig, create_app  # noqa: E402
from tests_support import package_env  # noqa: E402

SMALL = MergeSettings(budget=160, sinks=4, recent=32, block_size=8, slack=16)
# qwen2's end-of-generation tokens, kept from being sampled where a test needs a long reply
NO_EOS = {"151643": -100, "151645": -100}


@contextlib.contextmanager
def running(config: ServeConfig) -> Iterator[tuple[str, object]]:
    """The app on a port of its own (bound here, handed to uvicorn), in a thread."""
    app = create_app(config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1", app.state.edgemerge
    finally:
        server.should_exit = True
        thread.join(30)
        app.state.edgemerge.proxy.free()
        sock.close()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="unused", timeout=60, max_retries=0)


@pytest.fixture(scope="module")
def merging(tiny_qwen2_path: Path) -> Iterator[tuple[str, object]]:
    config = ServeConfig(
        model=str(tiny_qwen2_path),
        alias="tiny",
        merge=SMALL,
        n_ctx=256,
        n_batch=32,
        n_ctx_logical=2048,
        n_threads=1,
        max_tokens=24,
        seed=7,
    )
    with running(config) as live:
        yield live


@pytest.fixture(scope="module")
def plain(tiny_qwen2_path: Path) -> Iterator[tuple[str, object]]:
    config = ServeConfig(
        model=str(tiny_qwen2_path),
        alias="tiny",
        merge=None,
        n_ctx=1024,
        n_batch=64,
        n_threads=1,
        max_tokens=12,
        seed=7,
        max_conversations=4,
    )
    with running(config) as live:
        yield live


def words(seed: int, n: int) -> str:
    """``n`` distinct-looking words, different for each seed."""
    return " ".join(f"w{(seed * 7919 + i * 104729) % 10007}" for i in range(n))


def chat(c: openai.OpenAI, messages: list[dict], **kw) -> tuple[str, dict]:
    r = c.chat.completions.create(model="tiny", messages=messages, temperature=0, **kw)
    return r.choices[0].message.content, r.model_extra["edgemerge"]


def turn(messages: list[dict], reply: str, question: str) -> list[dict]:
    return messages + [
        {"role": "assistant", "content": reply},
        {"role": "user", "content": question},
    ]


# -- the OpenAI surface --------------------------------------------------------------------


def test_models_lists_the_served_name(merging):
    url, _ = merging
    assert [m.id for m in client(url).models.list().data] == ["tiny"]


def test_chat_stream_matches_non_stream_and_ends_with_the_counters(merging):
    url, _ = merging
    c = client(url)
    messages = [{"role": "user", "content": "say something"}]
    text, stats = chat(c, messages, max_tokens=10)
    assert stats["merging"] is True and stats["logical_tokens"] > 0
    chunks = list(
        c.chat.completions.create(
            model="tiny", messages=messages, temperature=0, max_tokens=10, stream=True
        )
    )
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == text
    last = chunks[-1]
    assert last.choices == [] and last.model_extra["edgemerge"]["cells"] > 0
    assert all("edgemerge" not in (ch.model_extra or {}) for ch in chunks[:-1])


def test_text_completions_stream_and_not(merging):
    url, _ = merging
    c = client(url)
    r = c.completions.create(model="tiny", prompt="one two three", max_tokens=6, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.model_extra["edgemerge"]["prompt_tokens_evaluated"] >= 1
    chunks = list(
        c.completions.create(
            model="tiny", prompt="one two three", max_tokens=6, temperature=0, stream=True
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
    assert chunks[-1].choices == [] and "edgemerge" in chunks[-1].model_extra


# -- conversations keep their caches --------------------------------------------------------


def test_a_resent_long_history_is_not_prefilled_again(merging):
    """A history past the physical cache (256 cells): the second request restores the
    conversation's merged cache and evaluates only its tail."""
    url, server = merging
    c = client(url)
    a = [{"role": "user", "content": words(1, 80)}]
    reply, first = chat(c, a, max_tokens=16)
    assert first["prompt_tokens_evaluated"] > 256
    assert first["logical_tokens"] > 256 >= first["cells"]
    assert first["merges"] + first["cells_evicted"] > 0
    b = [{"role": "user", "content": words(2, 40)}]
    chat(c, b, max_tokens=8)  # another conversation takes the context in between
    text, second = chat(c, turn(a, reply, "and then?"), max_tokens=8)
    # the whole first prompt came back from the cache, bar the last partial block
    assert second["prompt_tokens_cached"] >= first["logical_tokens"] - 16 - SMALL.block_size
    assert second["prompt_tokens_evaluated"] < 40
    assert second["cells"] <= 256 and second["conversations"] >= 2
    # the saved conversation holds its cells, not one per logical token
    full = second["logical_tokens"] * server.proxy()._bytes_per_cell
    assert second["conversation_bytes"] < 0.8 * full


def test_interleaved_conversations_give_what_each_gives_alone(plain, tiny_qwen2_path):
    """A1, B1, A2, B2 through the server equal A2 and B2 computed from scratch."""
    url, _ = plain
    c = client(url)
    a = [{"role": "user", "content": words(3, 30)}]
    b = [{"role": "user", "content": words(4, 40)}]
    a1, sa1 = chat(c, a)
    b1, _ = chat(c, b)
    a2_msgs, b2_msgs = turn(a, a1, "why?"), turn(b, b1, "how?")
    a2, sa2 = chat(c, a2_msgs)
    b2, sb2 = chat(c, b2_msgs)
    for s, before in ((sa2, sa1), (sb2, None)):
        assert s["prompt_tokens_evaluated"] < 40
        if before is not None:
            assert s["prompt_tokens_cached"] >= before["logical_tokens"] - 12 - 16
    fresh = Llama(str(tiny_qwen2_path), n_ctx=1024, n_batch=64, n_threads=1, seed=7, verbose=False)
    try:
        for msgs, got in ((a2_msgs, a2), (b2_msgs, b2)):
            out = fresh.create_chat_completion(msgs, temperature=0, max_tokens=12)
            assert out["choices"][0]["message"]["content"] == got
            fresh.reset()
    finally:
        fresh.close()


def test_idle_conversations_are_dropped_least_recently_used_first(plain):
    """max_conversations=4: a fifth conversation drops the one used longest ago, whose
    next turn is evaluated in full; the others still restore."""
    url, server = plain
    c = client(url)
    convs = [[{"role": "user", "content": words(10 + i, 25)}] for i in range(5)]
    replies = [chat(c, m)[0] for m in convs]
    cache = server.proxy().cache
    assert len(cache) == 4
    _, oldest = chat(c, turn(convs[0], replies[0], "again"))
    assert oldest["prompt_tokens_cached"] < 16  # only the template's first block is shared
    _, recent = chat(c, turn(convs[4], replies[4], "again"))
    assert recent["prompt_tokens_cached"] > 100


# -- bad input ------------------------------------------------------------------------------


def test_unknown_model_is_a_404_naming_the_served_one(merging):
    url, _ = merging
    with pytest.raises(openai.NotFoundError, match="'gpt-4o' is not served here.*'tiny'"):
        client(url).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
        )


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_past_the_logical_context_is_a_400(merging, stream):
    url, server = merging
    c = client(url)
    with pytest.raises(openai.BadRequestError, match="2048 .n_ctx_logical") as err:
        r = c.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": words(5, 450)}],
            max_tokens=4,
            stream=stream,
        )
        list(r) if stream else None
    assert err.value.code == "context_length_exceeded"
    text, _ = chat(c, [{"role": "user", "content": "still there?"}], max_tokens=4)
    assert isinstance(text, str)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"messages": "hello"}', "messages: Input should be a valid list"),
        (b'{"messages": []}', "give at least one message"),
        (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}', "max_tokens"),
    ],
)
def test_a_malformed_body_is_a_400_that_says_what_is_wrong(merging, body, message):
    url, _ = merging
    r = httpx.post(
        f"{url}/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400
    error = r.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"


def test_a_client_leaving_mid_stream_stops_the_generation(merging):
    """The openai client closes the stream after three chunks: the server stops at the
    next token, saves what it evaluated, and serves the next requests."""
    url, server = merging
    c = client(url)
    left_before = server.streams_left
    a = [{"role": "user", "content": words(6, 12)}]
    stream = c.chat.completions.create(
        model="tiny", messages=a, temperature=0, max_tokens=1500, stream=True, logit_bias=NO_EOS
    )
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    deadline = time.monotonic() + 30
    while server.streams_left == left_before:
        assert time.monotonic() < deadline, "the server did not notice the client leave"
        time.sleep(0.05)
    llm = server.proxy()
    # a generation run to its end would have passed 1500 tokens
    assert llm.n_tokens < 1000
    # the next request (another conversation) is served at once
    b = [{"role": "user", "content": words(7, 8)}]
    text, stats = chat(c, b, max_tokens=4)
    assert stats["prompt_tokens_evaluated"] > 0
    # and the cut conversation resumes from what was saved of it
    _, again = chat(c, a, max_tokens=4)
    assert again["prompt_tokens_cached"] > 40


def test_a_failure_mid_stream_ends_it_with_an_error_event(merging, monkeypatch):
    url, server = merging
    llm = server.proxy()
    calls = {"n": 0}
    original = type(llm).sample

    def failing_sample(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("the sampler broke")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(llm), "sample", failing_sample)
    body = {"messages": [{"role": "user", "content": "x y z"}], "max_tokens": 10, "stream": True}
    with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert "the sampler broke" in json.loads(events[-1])["error"]["message"]
    monkeypatch.undo()
    text, _ = chat(client(url), [{"role": "user", "content": "and now?"}], max_tokens=4)
    assert isinstance(text, str)


# -- the command ----------------------------------------------------------------------------


def test_serve_command_serves_until_stopped(tiny_llama_path):
    """`edgemerge serve` as a process: flags parsed, the model listed, a chat answered."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "edgemerge", "serve", "--model", str(tiny_llama_path)]
    cmd += ["--port", str(port), "--n-ctx", "512", "--n-batch", "64", "--threads", "1"]
    cmd += ["--sinks", "4", "--recent", "64", "--block-size", "8", "--alias", "tiny-llama"]
    proc = subprocess.Popen(
        cmd, env=package_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        c = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=30, max_retries=0
        )
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                ids = [m.id for m in c.models.list().data]
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "edgemerge serve did not start in 90 s"
                time.sleep(0.2)
        assert ids == ["tiny-llama"]
        r = c.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert r.model_extra["edgemerge"]["merging"] is True
    finally:
        proc.terminate()
        proc.wait(30)


def test_serve_rejects_a_bad_merge_flag_before_loading():
    out = subprocess.run(
        [sys.executable, "-m", "edgemerge", "serve", "--model", "x.gguf", "--sinks", "-3"],
        env=package_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and "sinks" in out.stderr
