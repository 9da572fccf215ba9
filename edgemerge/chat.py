"""`edgemerge chat`: a streaming terminal chat that keeps going past the physical cache.

The conversation is a list of messages rendered with the model's own chat
template on every turn; llama-cpp-python reuses the evaluated prefix, so a turn
only evaluates the new tokens, and `edgemerge.Llama` merges cells whenever the
cache would pass its budget. Slash commands: see :data:`COMMANDS`.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from edgemerge.settings import MergeSettings, SettingsError

COMMANDS = {
    "/stats": "merge statistics",
    "/reset": "forget the conversation and clear the cache",
    "/save FILE": "save the conversation (FILE) and the model state (FILE.state)",
    "/load FILE": "load a conversation saved with /save",
    "/budget X": "change the cell budget (cells, or a fraction like 0.5)",
    "/exit": "quit (also Ctrl-D)",
    "/help": "this list",
}


@dataclass
class ChatSession:
    """One conversation with a loaded ``llama_cpp.Llama`` or ``edgemerge.Llama``."""

    llm: object
    system: str | None = None
    max_tokens: int = 512
    temperature: float = 0.7
    seed: int | None = None
    messages: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.system and not self.messages:
            self.messages.append({"role": "system", "content": self.system})

    def send(self, text: str) -> Iterator[str]:
        """Add a user turn and stream the reply, piece by piece.

        The reply joins the history once complete, or with what was produced so far
        if the caller stops iterating (Ctrl-C).
        """
        self.messages.append({"role": "user", "content": text})
        stream = self.llm.create_chat_completion(
            messages=self.messages,
            stream=True,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            seed=self.seed,
        )
        reply: list[str] = []
        try:
            for chunk in stream:
                piece = chunk["choices"][0]["delta"].get("content")
                if piece:
                    reply.append(piece)
                    yield piece
        finally:
            self.messages.append({"role": "assistant", "content": "".join(reply)})

    def reset(self) -> None:
        self.messages = [m for m in self.messages[:1] if m["role"] == "system"]
        self.llm.reset()

    def status(self) -> str:
        """One line: logical tokens, cells, KV memory, merges."""
        if getattr(self.llm, "merge_settings", None) is None:
            return f"[{self.llm.n_tokens} tokens, no merging]"
        st = self.llm.merge_stats()
        return (
            f"[{st.logical_tokens} tokens in {st.cells} cells, KV {st.kv_bytes / 1e6:.1f} MB, "
            f"{st.merges} merges]"
        )

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps({"messages": self.messages}, indent=1))
        state = path.with_name(path.name + ".state")
        with open(state, "wb") as f:
            pickle.dump(self.llm.save_state(), f)
        return state

    def load(self, path: Path) -> None:
        self.messages = json.loads(path.read_text())["messages"]
        state = path.with_name(path.name + ".state")
        if state.exists():
            with open(state, "rb") as f:
                self.llm.load_state(pickle.load(f))
        else:
            self.llm.reset()


def set_budget(llm: object, value: str) -> MergeSettings:
    """Give ``llm`` (an ``edgemerge.Llama`` with merging) a new cell budget."""
    current = getattr(llm, "merge_settings", None)
    if current is None:
        raise SettingsError("budget: merging is off (--no-merge); restart without it")
    budget: int | float = int(value) if value.strip().isdigit() else float(value)
    new = dataclasses.replace(current, budget=budget)
    llm.set_merge_settings(new)
    return new


def _command(session: ChatSession, text: str, out: TextIO) -> bool:
    """Run a slash command; False means quit."""
    name, _, arg = text.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return False
    try:
        if name == "/stats":
            if getattr(session.llm, "merge_settings", None) is None:
                print(session.status(), file=out)
            else:
                for k, v in dataclasses.asdict(session.llm.merge_stats()).items():
                    print(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}", file=out)
        elif name == "/reset":
            session.reset()
            print("(conversation cleared)", file=out)
        elif name == "/save" and arg:
            state = session.save(Path(arg))
            print(f"(saved {arg} and {state})", file=out)
        elif name == "/load" and arg:
            session.load(Path(arg))
            print(f"(loaded {arg}: {len(session.messages)} messages)", file=out)
        elif name == "/budget" and arg:
            print(f"(budget is now {set_budget(session.llm, arg).budget})", file=out)
        else:
            for cmd, what in COMMANDS.items():
                print(f"  {cmd:<12} {what}", file=out)
    except (OSError, ValueError, KeyError, pickle.UnpicklingError) as exc:
        print(f"edgemerge: {name}: {exc}", file=out)
    return True


def save_history(session: ChatSession, history_dir: Path) -> Path | None:
    """Write the conversation to ``history_dir/<timestamp>.json``; None if it is empty."""
    if not any(m["role"] == "user" for m in session.messages):
        return None
    history_dir.mkdir(parents=True, exist_ok=True)
    path = history_dir / time.strftime("%Y%m%d-%H%M%S.json")
    path.write_text(json.dumps({"messages": session.messages}, indent=1))
    return path


def run_chat(
    session: ChatSession,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
    history_dir: Path | None = None,
) -> int:
    """Read-eval-print loop: Ctrl-D or /exit ends it; Ctrl-C stops only the current reply."""
    interactive = stdin.isatty()
    if interactive:
        print(
            "edgemerge chat: type a message; /help for commands, /exit or Ctrl-D to quit.",
            file=stdout,
        )
    try:
        while True:
            try:
                if interactive:
                    line = input("> ")
                else:
                    line = stdin.readline()
                    if not line:
                        raise EOFError
            except EOFError:
                print(file=stdout)
                return 0
            except KeyboardInterrupt:
                print(file=stdout)
                continue
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                if not _command(session, text, stdout):
                    return 0
                continue
            try:
                for piece in session.send(text):
                    stdout.write(piece)
                    stdout.flush()
            except KeyboardInterrupt:
                stdout.write(" [interrupted]")
            except ValueError as exc:
                # the context is full (no merging) or a setting cannot hold: say so, keep going
                session.messages.pop()  # the reply that never came
                session.messages.pop()  # and the turn that did not fit
                print(f"edgemerge: error: {exc}; /reset starts over", file=sys.stderr)
                continue
            stdout.write("\n")
            status = session.status()
            stdout.write(f"\x1b[2m{status}\x1b[0m\n" if interactive else f"{status}\n")
            stdout.flush()
    finally:
        if history_dir is not None:
            saved = save_history(session, history_dir)
            if saved is not None:
                print(f"(conversation saved to {saved})", file=sys.stderr)
