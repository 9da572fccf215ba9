"""`edgemerge chat` as a user meets it: a real terminal (tmux), pipes, real files; and the
chat session in-process on a real tiny model."""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest

from edgemerge import Llama, MergeSettings, models
from edgemerge.chat import (
    ChatFileError,
    ChatSession,
    StopOnInterrupt,
    cache_file,
    read_messages,
    run_chat,
    save_history,
)
from edgemerge.native import kvcells
from edgemerge.testing.tiny_models import write_tiny_model
from tests_support import english_text, package_env

WORDS = english_text().split()
LONG = " ".join(WORDS[:120])  # about 150 tokens: a few of these outgrow a 256-cell cache
N_CTX = 256
SETTINGS = MergeSettings(budget=208, recent=32, sinks=4, block_size=8, slack=16)
SMALL_CACHE = [
    "--n-ctx",
    str(N_CTX),
    "--n-batch",
    "32",
    "--recent",
    "32",
    "--sinks",
    "4",
    "--block-size",
    "8",
    "--slack",
    "16",
]
# "[871 tokens in 224 cells, KV 0.1 MB, 69 merges]"
PROMPT = r"(?m)^> ?$"  # capture-pane drops the trailing space of "> "
STATUS = re.compile(r"\[(\d+) tokens in (\d+) cells, KV (\d+\.\d) MB, (\d+) merges\]")


def chat(model, *extra: str, stdin: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "edgemerge",
            "chat",
            "--model",
            str(model),
            "--temperature",
            "0",
            "--history-dir",
            str(tmp_path / "history"),
            *extra,
        ],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env=package_env(),
    )


def statuses(stdout: str) -> list[tuple[int, int, float, int]]:
    """(tokens, cells, MB, merges) of every status line."""
    return [(int(t), int(c), float(mb), int(m)) for t, c, mb, m in STATUS.findall(stdout)]


def load(path, merge=SETTINGS, n_ctx=N_CTX) -> Llama:
    return Llama(
        str(path),
        merge=merge,
        n_ctx=n_ctx,
        n_batch=32,
        n_threads=1,
        n_threads_batch=1,
        seed=3,
        verbose=False,
    )


# -- the command, through pipes --------------------------------------------------------


def test_a_conversation_longer_than_the_cache_completes_with_merging(tiny_qwen2_path, tmp_path):
    turns = "".join(f"{LONG} ({i})\n" for i in range(7)) + "/stats\n/exit\n"
    out = chat(tiny_qwen2_path, *SMALL_CACHE, "--max-tokens", "8", stdin=turns, tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    seen = statuses(out.stdout)
    assert len(seen) == 7
    tokens, cells, _, merges = seen[-1]
    assert tokens > 4 * N_CTX and cells <= N_CTX and merges > 0
    assert all(c <= N_CTX for _, c, _, _ in seen)
    assert [t for t, _, _, _ in seen] == sorted(t for t, _, _, _ in seen)
    assert f"logical_tokens: {tokens}" in out.stdout and f"cells: {cells}" in out.stdout
    (saved,) = (tmp_path / "history").glob("*.json")
    assert f"conversation saved to {saved}" in out.stderr
    messages = read_messages(saved)
    assert [m["role"] for m in messages] == ["user", "assistant"] * 7
    assert messages[0]["content"] == f"{LONG} (0)"


def test_without_merging_a_full_context_is_a_one_line_error(tiny_qwen2_path, tmp_path):
    turns = "".join(f"{LONG} ({i})\n" for i in range(6)) + "/exit\n"
    out = chat(
        tiny_qwen2_path,
        "--no-merge",
        "--n-ctx",
        str(N_CTX),
        "--max-tokens",
        "8",
        stdin=turns,
        tmp_path=tmp_path,
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("edgemerge: error:")]
    assert len(errors) == 1 and "exceed context window" in errors[0], out.stderr
    assert "--no-merge" in errors[0]
    assert "no merging" in out.stdout  # the turn that fitted got its status line
    # the conversation is kept, without the turn that did not fit
    (saved,) = (tmp_path / "history").glob("*.json")
    assert [m["role"] for m in read_messages(saved)] == ["user", "assistant"]


def test_bad_merge_setting_is_one_line_naming_the_field(tiny_qwen2_path, tmp_path):
    out = chat(tiny_qwen2_path, "--block-size", "0", stdin="", tmp_path=tmp_path)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "edgemerge: error: block_size: 0 must be an integer in [1, 4096]"
    ]
    out = chat(tiny_qwen2_path, "--n-ctx", "600", stdin="", tmp_path=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("edgemerge: error: budget:")
    assert "default budget is n_ctx - n_batch - slack" in out.stderr


def test_slash_commands_budget_save_reset_load(tiny_qwen2_path, tmp_path):
    conv = tmp_path / "conv.json"
    script = "".join(f"{LONG} ({i})\n" for i in range(3))
    script += f"/budget 120\n{LONG} (3)\n/save {conv}\n/reset\n/stats\n"
    script += f"/load {conv}\nshort\n/budget abc\n/budget\n/save\n/nonsense\n/exit\n"
    out = chat(tiny_qwen2_path, *SMALL_CACHE, "--max-tokens", "4", stdin=script, tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "(budget is now 120)" in out.stdout
    seen = statuses(out.stdout)
    assert len(seen) == 5
    # the new budget holds from the next turn on, and again after the restored cache
    assert seen[3][1] <= 120 + 16 and seen[4][1] <= 120 + 16
    assert "(conversation cleared)" in out.stdout
    assert "logical_tokens: 0" in out.stdout  # /stats after /reset
    loaded = re.search(
        r"\(loaded (.*): 4 turns, cache restored \((\d+) tokens\)(.*)\)\n", out.stdout
    )
    assert loaded and loaded[1] == str(conv) and int(loaded[2]) == seen[3][0]
    assert re.fullmatch(r", recall store restored \(\d+ positions\)", loaded[3])
    assert seen[4][0] > seen[3][0]  # the turn after /load went on from the restored cache
    assert conv.exists() and cache_file(conv).exists()
    assert "edgemerge: error: budget: 'abc' is not a cell count" in out.stderr
    assert "(budget is 120)" in out.stdout and "(/save needs a file: /save FILE)" in out.stdout
    assert "(unknown command '/nonsense')" in out.stdout and "/budget X" in out.stdout
    assert "Traceback" not in out.stderr


# -- models without a chat template (base models) --------------------------------------


@pytest.fixture(scope="module")
def base_model_path(tmp_path_factory):
    """The tiny qwen2 with its chat template left out, as a base model's GGUF is."""
    path = tmp_path_factory.mktemp("base") / "tiny-base.gguf"
    return write_tiny_model(path, "qwen2", chat_template=False)


def test_a_model_without_a_chat_template_gets_a_plain_transcript(base_model_path):
    llm = load(base_model_path, merge=None, n_ctx=1024)
    assert "tokenizer.chat_template" not in llm.metadata
    session = ChatSession(llm, system="Be brief.", max_tokens=6, temperature=0)
    assert session.mode == "transcript"
    out = io.StringIO()
    assert run_chat(session, stdin=io.StringIO("hello there\nand again\n"), stdout=out) == 0
    first_line = out.getvalue().splitlines()[0]
    assert "tiny-base.gguf has no chat template" in first_line
    assert f"--model {models.load_registry().default}" in first_line
    replies = [m["content"] for m in session.messages if m["role"] == "assistant"]
    assert len(replies) == 2 and all(r == r.strip() for r in replies)
    # what the model was given: the transcript, not llama-2's [INST] markup
    seen = llm.detokenize(list(llm.input_ids[: llm.n_tokens]), special=True).decode(
        errors="replace"
    )
    assert "[INST]" not in seen
    assert (
        f"Be brief.\n\nUser: hello there\nAssistant: {replies[0]}\nUser: and again\nAssistant:"
        in seen
    )


def test_a_model_with_a_chat_template_uses_it(tiny_qwen2_path):
    session = ChatSession(load(tiny_qwen2_path), max_tokens=2, temperature=0)
    assert session.mode == "template"
    out = io.StringIO()
    assert run_chat(session, stdin=io.StringIO("hi\n"), stdout=out) == 0
    assert out.getvalue().splitlines()[0] == "(chat format: the chat template in tiny-qwen2.gguf)"
    # ChatML, from the GGUF
    llm = session.llm
    seen = llm.detokenize(list(llm.input_ids[: llm.n_tokens]), special=True)
    assert b"<|im_start|>user\nhi<|im_end|>" in seen


def pulled(name: str):
    try:
        return models.resolve_model(name, pull_missing=False, progress=False)
    except models.ModelNotFoundError:
        pytest.skip(f"{name} is not pulled: run `edgemerge models pull {name}`")


@pytest.mark.slow
def test_gemma_base_model_answers_in_the_chat(tmp_path):
    # Gemma 3 270M as shipped has no chat template; in llama-2 format it replied ""
    path = pulled("gemma-3-270m")
    turns = "What is the capital of France?\nAnd what is the capital of Italy?\n/exit\n"
    out = chat(path, "--max-tokens", "40", stdin=turns, tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "has no chat template, so it is a base model" in out.stdout.splitlines()[0]
    (saved,) = (tmp_path / "history").glob("*.json")
    replies = [m["content"] for m in read_messages(saved) if m["role"] == "assistant"]
    assert len(replies) == 2 and all(replies), replies
    assert not any("User:" in r or "Assistant:" in r for r in replies)  # cut at the turn
    assert "Paris" in replies[0], replies


# -- the session, in-process ----------------------------------------------------------


class CtrlCAfterEachMessage(io.StringIO):
    """Standard input whose reader presses Ctrl-C (SIGINT to this process) ``delay``
    seconds after sending each message, while the reply is being generated."""

    def __init__(self, text: str, delay: float):
        super().__init__(text)
        self.delay = delay
        self.timers: list[threading.Timer] = []

    def readline(self, *args) -> str:
        line = super().readline(*args)
        if line.strip() and not line.startswith("/"):
            timer = threading.Timer(self.delay, os.kill, (os.getpid(), signal.SIGINT))
            timer.start()
            self.timers.append(timer)
        return line


def test_ctrl_c_ends_the_reply_at_a_token_and_the_chat_goes_on(tiny_qwen2_path, tmp_path):
    handler_before = signal.getsignal(signal.SIGINT)
    llm = load(tiny_qwen2_path)
    max_tokens = 2000  # far longer than the test waits: only the interrupt ends the replies
    session = ChatSession(llm, max_tokens=max_tokens, temperature=0.8, seed=1)
    stdin = CtrlCAfterEachMessage("tell me a long story\n/stats\nand another\n", delay=1.0)
    out = io.StringIO()
    t0 = time.monotonic()
    status = run_chat(session, stdin=stdin, stdout=out, history_dir=tmp_path)
    for timer in stdin.timers:
        timer.join()
    assert status == 0
    assert time.monotonic() - t0 < 60
    text = out.getvalue()
    assert text.count(" [interrupted]") == 2, text[:500]
    assert "logical_tokens:" in text  # the chat went on after the interrupt
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2
    assert llm.n_tokens < max_tokens  # both replies together stayed far from the limit
    # stopped between tokens: the merged cache and its bookkeeping agree
    stats = llm.merge_stats()
    assert stats.cells == len(kvcells.list_cells(llm)) <= N_CTX
    assert signal.getsignal(signal.SIGINT) is handler_before


def test_a_stopped_reply_ends_within_one_token(tiny_qwen2_path):
    llm = load(tiny_qwen2_path)
    session = ChatSession(llm, max_tokens=500, temperature=0)
    # asked before each evaluation: the prompt (about 30 tokens), then one token at a time
    reply = "".join(session.send("hello", should_stop=lambda: llm.n_tokens >= 60))
    assert llm.n_tokens == 60
    assert session.messages[-1] == {"role": "assistant", "content": reply}
    list(session.send("and then?", should_stop=lambda: llm.n_tokens >= 100))
    assert llm.n_tokens == 100
    assert llm.merge_stats().cells == len(kvcells.list_cells(llm))


def test_a_second_ctrl_c_stops_at_once():
    handler_before = signal.getsignal(signal.SIGINT)
    with StopOnInterrupt() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs before this ends
    assert signal.getsignal(signal.SIGINT) is handler_before


def test_saved_cache_loads_only_into_the_same_kind_of_chat(tiny_qwen2_path, tmp_path):
    a = ChatSession(load(tiny_qwen2_path), max_tokens=4, temperature=0)
    for i in range(3):
        list(a.send(f"{LONG} ({i})"))
    conv = tmp_path / "conv.json"
    a.save(conv)

    same = ChatSession(load(tiny_qwen2_path), max_tokens=4, temperature=0)
    assert "cache restored" in same.load(conv)
    assert same.llm.n_tokens == a.llm.n_tokens
    assert same.llm.merge_stats().cells == a.llm.merge_stats().cells
    assert same.messages == a.messages

    bigger = ChatSession(load(tiny_qwen2_path, n_ctx=512), max_tokens=4, temperature=0)
    note = bigger.load(conv)
    assert "conv.json.kv was saved with n_ctx=256, this chat has 512" in note
    assert "the next turn evaluates them again" in note
    assert bigger.messages == a.messages and bigger.llm.n_tokens == 0

    plain = ChatSession(load(tiny_qwen2_path, merge=None, n_ctx=2048), max_tokens=4)
    assert "n_ctx=256" in plain.load(conv)


def test_a_loaded_chat_recalls_what_left_its_cache_before_the_save(tiny_qwen2_path, tmp_path):
    a = ChatSession(load(tiny_qwen2_path), max_tokens=4, temperature=0)
    for i in range(4):
        list(a.send(f"{LONG} ({i})"))
    conv = tmp_path / "conv.json"
    a.save(conv)
    held, n_saved = a.llm.merge_stats().store_positions, a.llm.n_tokens
    assert held > 0

    b = ChatSession(load(tiny_qwen2_path), max_tokens=4, temperature=0)
    assert f"cache restored ({n_saved} tokens), recall store restored ({held} positions)" in (
        b.load(conv)
    )
    question = f"{' '.join(WORDS[300:340])} What did I say first?"
    assert "".join(b.send(question)) == "".join(a.send(question))
    assert b.llm.merge_stats().blocks_restored > 0

    # a damaged store costs recall of the old turns, never the cache or the conversation
    kv = cache_file(conv)
    with np.load(kv, allow_pickle=False) as z:
        saved = {n: z[n] for n in z.files}
    saved["store_k"] = saved["store_k"][:, :, :-1]
    with open(kv, "wb") as f:
        np.savez(f, **saved)
    c = ChatSession(load(tiny_qwen2_path), max_tokens=4, temperature=0)
    note = c.load(conv)
    assert "cache restored" in note and "its recall store was not restored" in note
    assert "bytes" in note and c.llm.merge_stats().store_positions == 0
    assert c.llm.n_tokens == n_saved and c.messages == b.messages[: len(c.messages)]


@pytest.mark.parametrize(
    "content,message",
    [
        ("not json", "is not JSON"),
        ('{"messages": []}', "is not an edgemerge chat file"),
        ('{"format": "edgemerge-chat", "version": 9, "messages": []}', "has version 9"),
        (
            '{"format": "edgemerge-chat", "version": 1, "messages": [{"role": "robot"}]}',
            "must be a list of",
        ),
    ],
)
def test_bad_conversation_files_are_refused_with_the_reason(tmp_path, content, message):
    f = tmp_path / "c.json"
    f.write_text(content)
    with pytest.raises(ChatFileError, match=message):
        read_messages(f)


def test_history_never_overwrites_an_earlier_conversation(tiny_qwen2_path, tmp_path):
    session = ChatSession(load(tiny_qwen2_path), max_tokens=2, temperature=0)
    assert save_history(session, tmp_path) is None  # nothing said, nothing saved
    list(session.send("hello"))
    first, second = save_history(session, tmp_path), save_history(session, tmp_path)
    assert first != second and first.exists() and second.exists()
    assert read_messages(first) == read_messages(second) == session.messages


# -- a real terminal --------------------------------------------------------------------


class Tmux:
    """One program in a detached tmux session on a private tmux server."""

    def __init__(self, command: list[str], env: dict[str, str]):
        self.server = f"edgemerge-test-{uuid.uuid4().hex[:8]}"
        self.env = env  # the new server, and so the program, start with this environment
        # the shell prints the program's exit status (128 + n for a signal): tmux's own
        # pane_dead_status can stay empty when tmux notices the closed pty before the exit
        shell = f'{shlex.join(command)}; echo "[exit status $?]"'
        self._tmux("new-session", "-d", "-s", "chat", "-x", "160", "-y", "50", shell)
        self._tmux("set-option", "-t", "chat", "remain-on-exit", "on")

    def _tmux(self, *args: str) -> str:
        done = subprocess.run(
            ["tmux", "-L", self.server, *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=30,
            check=True,
        )
        return done.stdout

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-J", "-S", "-1000", "-t", "chat")

    def send(self, *keys: str, literal: bool = False) -> None:
        self._tmux("send-keys", "-t", "chat", *(["-l"] if literal else []), *keys)

    def wait_for(self, pattern: str, after: int = 0, timeout: float = 30.0) -> re.Match:
        """Poll the screen (from character ``after`` on) until ``pattern`` shows up."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.screen()[after:])
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} did not appear; screen:\n{self.screen()}")
            time.sleep(0.1)

    def exit_status(self) -> int | None:
        """The program's exit status, None while it runs."""
        found = re.search(r"\[exit status (\d+)\]", self.screen())
        return int(found[1]) if found else None

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.server, "kill-server"], capture_output=True)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_terminal_session_streams_reports_interrupts_and_exits(tiny_qwen2_path, tmp_path):
    history = tmp_path / "history"
    command = [
        sys.executable,
        "-m",
        "edgemerge",
        "chat",
        "--model",
        str(tiny_qwen2_path),
        *SMALL_CACHE,
        "--max-tokens",
        "100000",
        "--temperature",
        "0.8",
        "--seed",
        "5",
        "--history-dir",
        str(history),
    ]
    term = Tmux(command, package_env())
    try:
        term.wait_for(re.escape("/exit or Ctrl-D to quit"))
        term.wait_for(PROMPT)
        for turn in range(2):
            mark = len(term.screen().rstrip())
            term.send(f"{LONG} ({turn})", literal=True)
            term.send("Enter")
            term.wait_for(re.escape(f"({turn})") + r"\n", after=mark)
            if turn == 0:
                # the reply streams: its text shows while it is still being generated (it
                # is 100000 tokens long; only the status line would say it had ended)
                term.wait_for(re.escape(f"({turn})") + r"\n.*\S", after=mark)
                assert not STATUS.search(term.screen()[mark:])
            else:
                time.sleep(1.0)
            term.send("C-c")
            term.wait_for(re.escape(" [interrupted]"), after=mark)
            found = term.wait_for(STATUS.pattern, after=mark)
            assert int(found[2]) <= N_CTX  # cells
            term.wait_for(PROMPT, after=mark)
        tokens, cells, merges = int(found[1]), int(found[2]), int(found[4])
        assert tokens > N_CTX and merges > 0, found[0]  # two turns outgrew the cache
        mark = len(term.screen().rstrip())
        term.send("/stats", "Enter")
        term.wait_for(rf"logical_tokens: {tokens}\b", after=mark)
        term.wait_for(rf"(?m)^  cells: {cells}$", after=mark)
        # Ctrl-C at the prompt is not a way out either
        term.send("C-c")
        time.sleep(0.5)
        assert term.exit_status() is None, "Ctrl-C must not end the program"
        term.send("/exit", "Enter")
        saved = term.wait_for(r"conversation saved to (\S+\.json)")
        deadline = time.monotonic() + 15
        while term.exit_status() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert term.exit_status() == 0
        (path,) = history.glob("*.json")
        assert saved[1] == str(path)
        messages = read_messages(path)
        assert [m["content"] for m in messages if m["role"] == "user"] == [
            f"{LONG} (0)",
            f"{LONG} (1)",
        ]
        assert messages[1]["role"] == "assistant" and messages[1]["content"]  # as streamed
    finally:
        term.close()
