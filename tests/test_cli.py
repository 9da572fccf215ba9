"""The `edgemerge` command, run as a user runs it: a real process, real files."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests_support import package_env


def run_cli(*args: str, stdin: str = "", timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgemerge", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=package_env(),
    )


def test_help_lists_subcommands():
    out = run_cli("--help")
    assert out.returncode == 0
    for name in ("chat", "models", "convert", "bench"):
        assert name in out.stdout


@pytest.mark.parametrize("name", ["convert", "bench"])
def test_unavailable_subcommands_say_so(name):
    out = run_cli(name)
    assert out.returncode == 2
    assert "not available yet" in out.stderr
    assert "Traceback" not in out.stderr


def test_chat_bad_model_path_is_a_clean_error(tmp_path):
    out = run_cli("chat", "--model", str(tmp_path / "missing.gguf"))
    assert out.returncode == 1
    assert "missing.gguf" in out.stderr
    assert "Traceback" not in out.stderr


def test_chat_non_gguf_file_is_a_clean_error(tmp_path):
    f = tmp_path / "notes.gguf"
    f.write_text("this is not a model\n" * 10)
    out = run_cli("chat", "--model", str(f))
    assert out.returncode == 1
    assert "GGUF" in out.stderr
    assert "Traceback" not in out.stderr


def test_chat_truncated_gguf_is_a_clean_error(tmp_path, tiny_qwen2_path):
    data = tiny_qwen2_path.read_bytes()
    f = tmp_path / "truncated.gguf"
    f.write_bytes(data[: len(data) // 2])
    out = run_cli("chat", "--model", str(f))
    assert out.returncode == 1
    assert "truncated.gguf" in out.stderr
    assert "Traceback" not in out.stderr


def test_chat_streams_a_reply_and_exits(tiny_qwen2_path):
    out = run_cli(
        "chat",
        "--model",
        str(tiny_qwen2_path),
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        stdin="hello there\n/exit\nnever read\n",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip(), "the tiny model produced no reply"
    assert "Traceback" not in out.stderr


def test_chat_exits_on_end_of_input(tiny_qwen2_path):
    out = run_cli("chat", "--model", str(tiny_qwen2_path), "--max-tokens", "4", stdin="")
    assert out.returncode == 0, out.stderr


def test_models_list_names_both_models():
    out = run_cli("models", "list")
    assert out.returncode == 0, out.stderr
    assert "qwen2.5-coder-0.5b" in out.stdout and "gemma-3-270m" in out.stdout


def test_models_pull_unknown_name_is_a_clean_error():
    out = run_cli("models", "pull", "no-such-model")
    assert out.returncode == 1
    assert "no-such-model" in out.stderr and "qwen2.5-coder-0.5b" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_chat_with_default_model_answers():
    # The README's main job: `edgemerge chat` on the default model (Qwen 0.5B).
    out = run_cli(
        "chat",
        "--temperature",
        "0",
        "--max-tokens",
        "32",
        "--seed",
        "1",
        stdin="What is 7 times 6? Answer with just the number.\n/exit\n",
    )
    assert out.returncode == 0, out.stderr
    assert "42" in out.stdout
