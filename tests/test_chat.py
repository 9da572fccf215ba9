"""`edgemerge chat` as a user meets it: a real terminal (tmux), pipes, real files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from tests_support import package_env

LONG = " ".join(open("/usr/share/common-licenses/GPL-3").read().split()[:120])
SMALL_CACHE = [
    "--n-ctx",
    "256",
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


def test_a_conversation_longer_than_the_cache_completes_with_merging(tiny_qwen2_path, tmp_path):
    turns = "".join(f"{LONG} ({i})\n" for i in range(6)) + "/stats\n/exit\n"
    out = chat(tiny_qwen2_path, *SMALL_CACHE, "--max-tokens", "8", stdin=turns, tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    statuses = [
        line for line in out.stdout.splitlines() if line.startswith("[") and "cells" in line
    ]
    assert len(statuses) == 6
    last = statuses[-1]  # "[N tokens in C cells, KV x MB, M merges]"
    tokens, cells = int(last[1:].split()[0]), int(last.split(" in ")[1].split()[0])
    assert tokens > 4 * 256 and cells <= 256
    assert "logical_tokens:" in out.stdout and "cells_merged:" in out.stdout
    (saved,) = (tmp_path / "history").glob("*.json")
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages].count("user") == 6


def test_without_merging_a_full_context_is_a_clear_error_not_a_traceback(tiny_qwen2_path, tmp_path):
    turns = "".join(f"{LONG} ({i})\n" for i in range(6)) + "/exit\n"
    out = chat(
        tiny_qwen2_path,
        "--no-merge",
        "--n-ctx",
        "256",
        "--max-tokens",
        "8",
        stdin=turns,
        tmp_path=tmp_path,
    )
    assert out.returncode == 0
    assert "exceed context window" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_merge_setting_names_the_field(tiny_qwen2_path, tmp_path):
    out = chat(tiny_qwen2_path, "--block-size", "0", stdin="", tmp_path=tmp_path)
    assert out.returncode == 1
    assert "block_size" in out.stderr and "Traceback" not in out.stderr
    out = chat(tiny_qwen2_path, "--budget", "-3", stdin="", tmp_path=tmp_path)
    assert out.returncode == 1 and "budget" in out.stderr


def test_slash_commands_save_load_budget_reset(tiny_qwen2_path, tmp_path):
    conv = tmp_path / "conv.json"
    script = f"hello\n/save {conv}\n/budget 150\n/reset\n/load {conv}\n/stats\n/nonsense\n/exit\n"
    out = chat(tiny_qwen2_path, *SMALL_CACHE, "--max-tokens", "4", stdin=script, tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    assert conv.exists() and conv.with_name("conv.json.state").exists()
    assert "(budget is now 150)" in out.stdout
    assert "(conversation cleared)" in out.stdout
    assert "(loaded" in out.stdout
    assert "/budget X" in out.stdout  # unknown command prints the help


class Tmux:
    def __init__(self, command: list[str], env: dict[str, str]):
        self.name = f"em-{uuid.uuid4().hex[:8]}"
        exports = " ".join(f"{k}='{v}'" for k, v in env.items() if k in ("PYTHONPATH", "HOME"))
        subprocess.run(
            [
                "tmux",
                "new-session",
                "-d",
                "-s",
                self.name,
                "-x",
                "200",
                "-y",
                "50",
                f"env {exports} {' '.join(command)}",
            ],
            check=True,
        )

    def screen(self) -> str:
        return subprocess.run(
            ["tmux", "capture-pane", "-p", "-S", "-200", "-t", self.name],
            capture_output=True,
            text=True,
        ).stdout

    def send(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def wait_for(self, text: str, timeout: float = 60.0, after: int = 0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if text in screen[after:]:
                return screen
            time.sleep(0.1)
        raise AssertionError(f"{text!r} did not appear; screen:\n{self.screen()}")

    def alive(self) -> bool:
        return (
            subprocess.run(["tmux", "has-session", "-t", self.name], capture_output=True).returncode
            == 0
        )

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_terminal_session_streams_reports_interrupts_and_exits(tiny_qwen2_path, tmp_path):
    history = tmp_path / "history"
    cmd = [
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
        "--history-dir",
        str(history),
    ]
    term = Tmux(cmd, package_env())
    try:
        term.wait_for("/exit or Ctrl-D to quit")
        term.wait_for("\n>")
        term.send("tell me a story", "Enter")
        time.sleep(1.5)  # a long reply is streaming: interrupt it
        term.send("C-c")
        screen = term.wait_for("[interrupted]")
        assert "MB" in term.wait_for("cells, KV")
        n = len(screen)
        term.send("/stats", "Enter")
        term.wait_for("logical_tokens:", after=max(0, n - 200))
        assert term.alive(), "Ctrl-C must stop the reply, not the program"
        term.send("/exit", "Enter")
        deadline = time.monotonic() + 30
        while term.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not term.alive()
        (saved,) = history.glob("*.json")
        assert json.loads(saved.read_text())["messages"][0]["content"] == "tell me a story"
    finally:
        term.close()
