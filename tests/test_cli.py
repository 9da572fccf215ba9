"""The `edgemerge` command, run as a user runs it: a real process, real files."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from edgemerge import MergeSettings
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


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--budgets", "0"], "budgets must be percentages"),
        (["--budgets", "100"], "budgets must be percentages"),
        (["--context", "10"], "n_context must be >= 256"),
    ],
)
def test_bench_bad_settings_are_clean_errors(flags, message):
    out = run_cli("bench", "--no-progress", *flags)
    assert out.returncode == 2
    assert message in out.stderr
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


def test_chat_streams_a_reply_and_exits(tiny_qwen2_path, tmp_path):
    out = run_cli(
        "chat",
        "--model",
        str(tiny_qwen2_path),
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--history-dir",
        str(tmp_path),
        stdin="hello there\n/exit\nnever read\n",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip(), "the tiny model produced no reply"
    assert "Traceback" not in out.stderr
    (saved,) = tmp_path.glob("*.json")  # the conversation, saved on /exit
    assert "hello there" in saved.read_text() and "never read" not in saved.read_text()


def test_chat_exits_on_end_of_input(tiny_qwen2_path, tmp_path):
    history = ["--history-dir", str(tmp_path)]
    out = run_cli("chat", "--model", str(tiny_qwen2_path), "--max-tokens", "4", *history, stdin="")
    assert out.returncode == 0, out.stderr
    assert not list(tmp_path.iterdir())  # nothing said, nothing saved


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
        "--no-history",
        stdin="What is 7 times 6? Answer with just the number.\n/exit\n",
    )
    assert out.returncode == 0, out.stderr
    assert "42" in out.stdout


# -- `edgemerge chat` flags: one per MergeSettings field ---------------------------------


def chat_args(*flags: str):
    from edgemerge.cli import build_parser

    return build_parser().parse_args(["chat", "--model", "m.gguf", *flags])


def test_every_merge_setting_has_a_chat_flag():
    out = run_cli("chat", "--help")
    assert out.returncode == 0, out.stderr
    for f in dataclasses.fields(MergeSettings):
        flag = "--" + f.name.replace("_", "-")
        assert flag in out.stdout, f"{flag} is missing from `edgemerge chat --help`"
        if isinstance(f.default, bool):
            assert "--no-" + f.name.replace("_", "-") in out.stdout
    assert "--no-merge" in out.stdout


def test_chat_flags_build_the_settings_they_name():
    from edgemerge.cli import merge_settings_from_args

    given = [
        "--budget", "300", "--block-size", "8", "--sinks", "4", "--recent", "64",
        "--threshold", "0.25", "--similarity-layers", "1,3", "--retain-top", "0.1",
        "--sigma", "2.5", "--no-magnitude", "--no-attention-bias", "--slack", "8",
        "--max-merge-error", "0.3", "--eviction", "none", "--store-type", "q8_0",
    ]  # fmt: skip
    settings = merge_settings_from_args(chat_args(*given))
    assert settings == MergeSettings(
        budget=300,
        block_size=8,
        sinks=4,
        recent=64,
        threshold=0.25,
        similarity_layers=(1, 3),
        retain_top=0.1,
        sigma=2.5,
        magnitude=False,
        attention_bias=False,
        slack=8,
        max_merge_error=0.3,
        eviction="none",
        store_type="q8_0",
    )
    # a flag left out keeps the MergeSettings default; the budget's default is the chat's
    defaults = merge_settings_from_args(chat_args())
    assert defaults == MergeSettings(budget=4096 - 512 - MergeSettings.slack)
    small = merge_settings_from_args(
        chat_args("--n-ctx", "256", "--n-batch", "32", "--slack", "16")
    )
    assert small.budget == 256 - 32 - 16 and small.slack == 16
    assert merge_settings_from_args(chat_args("--budget", "0.5")).budget == 0.5
    assert merge_settings_from_args(chat_args("--budget", "1.0")).budget == 1.0  # a fraction
    assert (
        merge_settings_from_args(chat_args("--threshold", "calibrated")).threshold == "calibrated"
    )
    assert merge_settings_from_args(chat_args("--magnitude")).magnitude is True
    assert merge_settings_from_args(chat_args("--no-merge", "--budget", "5")) is None


@pytest.mark.parametrize(
    "flags,field",
    [
        (["--budget", "0"], "budget"),
        (["--budget", "1.5"], "budget"),
        (["--budget", "lots"], "budget"),
        (["--block-size", "0"], "block_size"),
        (["--sinks", "-1"], "sinks"),
        (["--recent", "2.5"], "recent"),
        (["--threshold", "1.5"], "threshold"),
        (["--threshold", "auto"], "threshold"),
        (["--similarity-layers", "first_half"], "similarity_layers"),
        (["--similarity-layers", "-1"], "similarity_layers"),
        (["--retain-top", "1"], "retain_top"),
        (["--sigma", "0"], "sigma"),
        (["--slack", "-4"], "slack"),
        (["--max-merge-error", "5"], "max_merge_error"),
        (["--eviction", "lru"], "eviction"),
        (["--store-type", "q4_0"], "store_type"),
        (["--n-ctx", "256"], "budget"),  # the default budget would be below one cell
    ],
)
def test_bad_chat_settings_are_one_line_naming_the_field(capsys, flags, field):
    from edgemerge.cli import main

    assert main(["chat", "--model", "/nonexistent/m.gguf", *flags]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"edgemerge: error: {field}: "), err


@pytest.mark.parametrize("flag", ["--n-ctx", "--n-batch", "--max-tokens", "--threads"])
def test_chat_sizes_must_be_positive(capsys, flag):
    from edgemerge.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["chat", flag, "0"])
    assert exit_.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err
