"""`edgemerge chat`: a streaming terminal chat that keeps going past the physical cache.

The conversation is a list of messages rendered with the model's own chat
template (from the GGUF) on every turn; llama-cpp-python reuses the evaluated
prefix, so a turn only evaluates the new tokens, and `edgemerge.Llama` merges
cells whenever the cache would pass its budget.

A GGUF without ``tokenizer.chat_template`` is a base model (Gemma 3 270M as shipped
is one). llama-cpp-python would render it in the llama-2 ``[INST]`` format, which such
a model has never seen, and it answers with an end of turn at once. Those models are
run as plain completion instead: the conversation is a ``User: ...`` /
``Assistant: ...`` transcript ending in ``Assistant:``, and a reply stops where the
model starts the next ``User:`` (or ``Assistant:``) line. The chat says which of the
two modes it uses before the first turn.

Files:

- History: on exit the conversation is written to
  ``<history dir>/<YYYYmmdd-HHMMSS>.json`` (never overwriting an older one) and
  the path is printed.
- ``/save FILE`` writes the same JSON to FILE, and the evaluated cache (the
  llama.cpp context state with its merged cells, the token ids, the seed, and with
  recall on the recall store: the originals of what left the cache) to ``FILE.kv``,
  an uncompressed numpy ``.npz`` read back without pickle.
- ``/load FILE`` takes the messages from any such JSON (a /save or a history
  file). When ``FILE.kv`` exists and was saved by the same model file with the
  same cache size and merging mode, the cache is restored too, so the next turn
  evaluates only its new tokens, and the recall store with it, so that a later
  turn still recalls the turns merged or evicted before the save (a store that
  cannot be read costs only that, and the load message says so); otherwise the
  next turn evaluates the loaded conversation again (and merges it again where it
  is long).

Interrupting: the first Ctrl-C stops the reply before its next token is
evaluated (after the prompt, if that is still being evaluated); the reply so
far stays in the conversation. A second Ctrl-C interrupts at once, between two
batches of a long prompt too (the next turn evaluates what was cut off again).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

import numpy as np
from jinja2 import TemplateError

from edgemerge.merging.planner import BudgetError
from edgemerge.settings import MergeSettings, SettingsError

COMMANDS = {
    "/stats": "merge statistics and the settings in force",
    "/reset": "forget the conversation and clear the cache",
    "/save FILE": "save the conversation to FILE and the cache to FILE.kv",
    "/load FILE": "load a conversation (a /save or a history file)",
    "/budget X": "change the cell budget: cells (e.g. 2048) or a fraction (e.g. 0.5)",
    "/exit": "quit (also Ctrl-D); the conversation is saved to the history folder",
    "/help": "this list",
}
FORMAT = "edgemerge-chat"
FORMAT_VERSION = 1

ChatMode = Literal["template", "transcript"]
TEMPLATE: ChatMode = "template"
TRANSCRIPT: ChatMode = "transcript"
# A base model continues the transcript with the next speaker's line; that is where its
# reply ends (the second one catches a model that answers itself twice).
TRANSCRIPT_STOP = ["\nUser:", "\nAssistant:"]
_SPEAKERS = {"user": "User", "assistant": "Assistant"}


class ChatFileError(ValueError):
    """A conversation or cache file cannot be used; the message says why."""


@dataclass
class ChatSession:
    """One conversation with a loaded ``edgemerge.Llama`` (merging or not).

    Attributes:
        llm: the model; ``llm.merge_settings`` is None when merging is off.
        system: optional system prompt, the first message of every conversation.
        max_tokens: longest reply, in tokens.
        temperature: sampling temperature (0 = greedy).
        seed: sampling seed (None = llama-cpp-python's default).
        messages: the conversation so far, as chat-completion messages.
        mode: ``"template"`` (the GGUF's chat template) or ``"transcript"`` (plain
            completion of a User/Assistant transcript, for base models); None picks
            by whether the GGUF has a chat template (see :func:`chat_mode`).
    """

    llm: Any
    system: str | None = None
    max_tokens: int = 512
    temperature: float = 0.7
    seed: int | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    mode: ChatMode | None = None

    def __post_init__(self) -> None:
        if self.system and not self.messages:
            self.messages.append({"role": "system", "content": self.system})
        if self.mode is None:
            self.mode = chat_mode(self.llm)
        elif self.mode not in (TEMPLATE, TRANSCRIPT):
            raise ValueError(f"mode must be {TEMPLATE!r} or {TRANSCRIPT!r}, not {self.mode!r}")

    def mode_line(self) -> str:
        """One sentence for the user: how this chat talks to the model, and why."""
        name = Path(str(getattr(self.llm, "model_path", "the model"))).name
        if self.mode == TEMPLATE:
            return f"(chat format: the chat template in {name})"
        from edgemerge.models import load_registry

        return (
            f"({name} has no chat template, so it is a base model: the chat is a plain "
            "'User: ... / Assistant:' transcript for it to continue. For a chat-tuned model "
            f"use --model {load_registry().default})"
        )

    @property
    def merging(self) -> bool:
        return getattr(self.llm, "merge_settings", None) is not None

    def send(self, text: str, should_stop: Callable[[], bool] = lambda: False) -> Iterator[str]:
        """Add a user turn and stream the reply, piece by piece.

        ``should_stop`` is asked before every evaluation (each decoded token) and after
        every piece; once it says so, the reply ends there, with the cache as it was
        after the last token evaluated. The reply joins the conversation however it ends.
        """
        from edgemerge.llama import GenerationStopped  # loads llama_cpp: not at CLI start

        self.messages.append({"role": "user", "content": text})
        reply: list[str] = []
        sampling = dict(max_tokens=self.max_tokens, temperature=self.temperature, seed=self.seed)
        try:
            with self.llm.stop_when(should_stop):
                if self.mode == TRANSCRIPT:
                    stream = self.llm.create_completion(
                        transcript(self.messages), stream=True, stop=TRANSCRIPT_STOP, **sampling
                    )
                    pieces = _trimmed(chunk["choices"][0]["text"] for chunk in stream)
                else:
                    stream = self.llm.create_chat_completion(
                        messages=self.messages, stream=True, **sampling
                    )
                    pieces = (chunk["choices"][0]["delta"].get("content") for chunk in stream)
                for piece in pieces:
                    if piece:
                        reply.append(piece)
                        yield piece
                    if should_stop():
                        stream.close()
                        break
        except GenerationStopped:
            pass
        finally:
            self.messages.append({"role": "assistant", "content": "".join(reply)})

    def drop_last_turn(self) -> None:
        """Forget the last user turn and its reply (a turn that failed)."""
        while self.messages and self.messages[-1]["role"] != "user":
            self.messages.pop()
        if self.messages:
            self.messages.pop()

    def reset(self) -> None:
        self.messages = [m for m in self.messages[:1] if m["role"] == "system"]
        self.llm.reset()

    def status(self) -> str:
        """One line: logical tokens, cells, KV memory, merges."""
        if not self.merging:
            return f"[{self.llm.n_tokens} of {self.llm.n_ctx()} tokens, no merging]"
        st = self.llm.merge_stats()
        return (
            f"[{st.logical_tokens} tokens in {st.cells} cells, KV {st.kv_bytes / 1e6:.1f} MB, "
            f"{st.merges} merges]"
        )

    def stats_lines(self) -> list[str]:
        if not self.merging:
            return [self.status()]
        lines = []
        for name, value in dataclasses.asdict(self.llm.merge_stats()).items():
            lines.append(
                f"  {name}: {value:.4g}" if isinstance(value, float) else f"  {name}: {value}"
            )
        settings = ", ".join(f"{k}={v}" for k, v in self.llm.merge_settings.to_dict().items())
        lines.append(f"  settings: {settings}")
        return lines

    # -- files ---------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        settings = self.llm.merge_settings
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "model": str(self.llm.model_path),
            "merge": settings.to_dict() if settings is not None else None,
            "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "messages": self.messages,
        }

    def save(self, path: Path) -> Path:
        """Write the conversation to ``path`` and the cache to ``path.kv``; returns the latter."""
        path.write_text(json.dumps(self.to_json(), indent=1, ensure_ascii=False))
        state = self.llm.save_state()
        snap = self.llm.recall_store() if hasattr(self.llm, "recall_store") else None
        kv_path = cache_file(path)
        with open(kv_path, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(
                f,
                llama_state=np.frombuffer(state.llama_state, dtype=np.uint8),
                input_ids=np.asarray(state.input_ids[: state.n_tokens], dtype=np.int32),
                seed=np.int64(state.seed),
                **_cache_identity(self.llm),
                # the originals of what left the cache: loaded again, the chat still recalls it
                **(snap.to_arrays() if snap is not None else {}),
            )
        return kv_path

    def load(self, path: Path) -> str:
        """Take the conversation from ``path`` (and the cache from ``path.kv`` when it fits);
        returns a sentence saying what was restored."""
        messages = read_messages(path)
        kv_path = cache_file(path)
        restored = False
        why, note = f"no {kv_path.name}", ""
        if kv_path.exists():
            try:
                why, note = self._load_cache(kv_path)
            except KeyboardInterrupt:
                self.llm.reset()  # a half-restored cache must not be reused
                raise
            restored = not why
        self.messages = messages
        if not restored:
            self.llm.reset()
        turns = sum(m["role"] == "user" for m in messages)
        if restored:
            return (
                f"loaded {path}: {turns} turns, cache restored ({self.llm.n_tokens} tokens)" + note
            )
        return f"loaded {path}: {turns} turns; {why}, so the next turn evaluates them again"

    def _load_cache(self, kv_path: Path) -> tuple[str, str]:
        """Restore the cache from ``kv_path``; returns why not ("" when it was restored)
        and what to add to the load message about the recall store."""
        import llama_cpp  # edgemerge is imported, so this is the patched library

        try:
            with np.load(kv_path, allow_pickle=False) as z:
                saved = {k: z[k] for k in z.files}
        except (OSError, ValueError) as exc:
            return f"{kv_path.name} is not a readable cache ({exc})", ""
        mine = _cache_identity(self.llm)
        missing = sorted((set(mine) | {"llama_state", "input_ids", "seed"}) - set(saved))
        if missing:
            return f"{kv_path.name} lacks {', '.join(missing)}", ""
        for key, value in mine.items():
            if saved[key].item() != value.item():
                return (
                    f"{kv_path.name} was saved with {key}={saved[key].item()!r}, this chat has "
                    f"{value.item()!r}",
                    "",
                )
        ids = saved["input_ids"]
        if len(ids) > len(self.llm.input_ids):
            return f"{kv_path.name} holds {len(ids)} tokens, more than this chat's context", ""
        input_ids = np.zeros(len(self.llm.input_ids), dtype=np.intc)
        input_ids[: len(ids)] = ids
        blob = saved["llama_state"].tobytes()
        state = llama_cpp.LlamaState(
            input_ids=input_ids,
            # logits are not kept between calls (logits_all=False), so there are none to restore
            scores=np.zeros((1, self.llm.n_vocab()), dtype=np.single),
            n_tokens=len(ids),
            llama_state=blob,
            llama_state_size=len(blob),
            seed=int(saved["seed"]),
        )
        try:
            self.llm.load_state(state)
        except (RuntimeError, ValueError) as exc:
            self.llm.reset()
            return f"llama.cpp refused {kv_path.name} ({exc})", ""
        return "", self._load_store(saved)

    def _load_store(self, saved: dict[str, np.ndarray]) -> str:
        """Give the restored cache its recall store back; returns what to add to the
        load message. A store that cannot be read costs recall of the history before
        the save, not the cache."""
        from edgemerge.recall import RecallError, StoreFileError, StoreSnapshot

        settings = getattr(self.llm, "merge_settings", None)
        recalling = settings is not None and settings.recall
        try:
            snap = StoreSnapshot.from_arrays(saved)
            if snap is None or not snap.positions.size:
                return ""
            if not recalling:
                return "; recall is off, so the recall store saved with it is not used"
            kept = self.llm.load_recall_store(snap)
        except (StoreFileError, RecallError) as exc:
            return (
                f"; its recall store was not restored ({exc}), so what had left the cache "
                "before the save cannot be recalled"
            )
        return f", recall store restored ({kept} positions)"


def chat_mode(llm: Any) -> ChatMode:
    """``"template"`` when ``llm``'s GGUF has a chat template (or ``llm`` was given a chat
    handler of its own), else ``"transcript"``: without one llama-cpp-python falls back
    to the llama-2 format, which a base model does not answer."""
    metadata = getattr(llm, "metadata", None) or {}
    if "tokenizer.chat_template" in metadata or getattr(llm, "chat_handler", None) is not None:
        return TEMPLATE
    return TRANSCRIPT


def transcript(messages: list[dict[str, str]]) -> str:
    """The conversation as plain text for a base model, ending where the reply begins.

    The system prompt, if any, opens it as a paragraph of its own; then one
    ``User: ...`` or ``Assistant: ...`` line per turn, and a last ``Assistant:``.
    """
    lines = []
    for message in messages:
        if message["role"] == "system":
            lines.append(message["content"].strip() + "\n")
        else:
            lines.append(f"{_SPEAKERS[message['role']]}: {message['content'].strip()}")
    # no space after the colon: the model's first token carries its own leading space
    return "\n".join(lines + ["Assistant:"])


def _trimmed(pieces: Iterator[str]) -> Iterator[str]:
    """The reply without the space after "Assistant:" and the newline before the next
    speaker: leading whitespace is dropped, inner whitespace is held back until more
    text follows it."""
    started = False
    pending = ""
    for piece in pieces:
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        text = pending + piece
        body = text.rstrip()
        pending = text[len(body) :]
        if body:
            yield body


def cache_file(path: Path) -> Path:
    """Where ``/save path`` puts the cache."""
    return path.with_name(path.name + ".kv")


def _cache_identity(llm: Any) -> dict[str, np.ndarray]:
    """What a saved cache must match to be loaded into ``llm``."""
    model = Path(llm.model_path)
    return {
        "model_name": np.str_(model.name),
        "model_bytes": np.int64(model.stat().st_size),
        "n_ctx": np.int64(llm.n_ctx()),
        "merging": np.bool_(getattr(llm, "merge_settings", None) is not None),
    }


def read_messages(path: Path) -> list[dict[str, str]]:
    """The messages of a conversation file written by /save or on exit."""
    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError as exc:
        raise ChatFileError(f"{path} is not a text file ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise ChatFileError(f"{path} is not JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ChatFileError(f'{path} is not an edgemerge chat file (no "format": "{FORMAT}")')
    if data.get("version") != FORMAT_VERSION:
        raise ChatFileError(
            f"{path} has version {data.get('version')!r}; this edgemerge reads {FORMAT_VERSION}"
        )
    messages = data.get("messages")
    ok = isinstance(messages, list) and all(
        isinstance(m, dict)
        and m.get("role") in ("system", "user", "assistant")
        and isinstance(m.get("content"), str)
        for m in messages
    )
    if not ok:
        raise ChatFileError(
            f"{path}: 'messages' must be a list of {{role: system|user|assistant, content: text}}"
        )
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def parse_budget(text: str) -> int | float:
    """A budget as typed: an int is a cell count, anything else a fraction."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise SettingsError(
            f"budget: {text!r} is not a cell count (e.g. 2048) or a fraction (e.g. 0.5)"
        ) from None


def set_budget(llm: Any, text: str) -> MergeSettings:
    """Give ``llm`` (an ``edgemerge.Llama`` with merging) a new cell budget."""
    current = getattr(llm, "merge_settings", None)
    if current is None:
        raise SettingsError("budget: merging is off (--no-merge); restart without --no-merge")
    new = dataclasses.replace(current, budget=parse_budget(text))
    llm.set_merge_settings(new)  # checks that the budget fits the cache and a batch
    return new


class StopOnInterrupt:
    """While active, the first Ctrl-C only sets :attr:`requested`; a second one raises
    KeyboardInterrupt as usual. Outside the main thread it changes nothing."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopOnInterrupt:
        self.requested = False
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: signals stay as they are
            self._previous = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _command(session: ChatSession, text: str, out: TextIO) -> bool:
    """Run a slash command; False means quit."""
    name, _, arg = text.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return False
    try:
        if name == "/stats":
            print("\n".join(session.stats_lines()), file=out)
        elif name == "/reset":
            session.reset()
            print("(conversation cleared)", file=out)
        elif name in ("/save", "/load") and not arg:
            print(f"({name} needs a file: {name} FILE)", file=out)
        elif name == "/save":
            kv_path = session.save(Path(arg).expanduser())
            print(f"(saved {arg} and {kv_path})", file=out)
        elif name == "/load":
            print(f"({session.load(Path(arg).expanduser())})", file=out)
        elif name == "/budget" and not arg:
            merge = session.llm.merge_settings
            print(f"(budget is {merge.budget})" if merge else "(merging is off)", file=out)
        elif name == "/budget":
            print(f"(budget is now {set_budget(session.llm, arg).budget})", file=out)
        else:
            if name not in ("/help", "/?"):
                print(f"(unknown command {name!r})", file=out)
            for cmd, what in COMMANDS.items():
                print(f"  {cmd:<12} {what}", file=out)
    except (OSError, ValueError, BudgetError) as exc:
        print(f"edgemerge: error: {exc}", file=sys.stderr)
    return True


def save_history(session: ChatSession, history_dir: Path) -> Path | None:
    """Write the conversation to a new ``history_dir/<timestamp>.json``; None if it is empty."""
    if not any(m["role"] == "user" for m in session.messages):
        return None
    history_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = json.dumps(session.to_json(), indent=1, ensure_ascii=False)
    for n in range(1000):
        path = history_dir / (f"{stamp}.json" if n == 0 else f"{stamp}-{n}.json")
        try:
            with open(path, "x", encoding="utf-8") as f:
                f.write(text)
            return path
        except FileExistsError:
            continue
    raise OSError(f"{history_dir} already has 1000 conversations saved at {stamp}")


def _turn_error(session: ChatSession, exc: Exception) -> str:
    text = str(exc)
    if "exceed context window" in text:
        if session.merging:
            return f"{text}: the conversation has reached the model's trained context"
        return f"{text}: the cache is full; without --no-merge it would merge and go on"
    return text


def run_chat(
    session: ChatSession,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    history_dir: Path | None = None,
) -> int:
    """Read-eval-print loop: Ctrl-D or /exit ends it; Ctrl-C stops only the current reply.

    Returns the exit status: 0, or 1 when a turn failed and stdin is not a terminal
    (a scripted conversation stops at its first failure; a person may go on).
    """
    stdin = stdin if stdin is not None else sys.stdin
    stdout = stdout if stdout is not None else sys.stdout
    interactive = stdin.isatty()
    dim = stdout.isatty() and os.environ.get("NO_COLOR") is None
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        print(
            "edgemerge chat: type a message; /help for commands, /exit or Ctrl-D to quit.",
            file=stdout,
        )
    print(session.mode_line(), file=stdout)
    hangup = _exit_on_hangup()
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
                try:
                    if not _command(session, text, stdout):
                        return 0
                except KeyboardInterrupt:
                    print("(interrupted)", file=stdout)
                continue
            try:
                with StopOnInterrupt() as interrupt:
                    for piece in session.send(text, should_stop=interrupt):
                        stdout.write(piece)
                        stdout.flush()
                stopped = interrupt.requested
            except KeyboardInterrupt:
                # a second Ctrl-C: it may have landed inside edgemerge.Llama's bookkeeping
                session.llm.resync_cache()
                stopped = True
            except (ValueError, BudgetError, TemplateError) as exc:
                # the context is full, the budget cannot hold, or the template refuses the
                # conversation: the turn is dropped, the cache kept as far as it got
                session.llm.resync_cache()
                session.drop_last_turn()
                stdout.flush()
                hint = "; /reset starts over" if interactive else ""
                print(f"edgemerge: error: {_turn_error(session, exc)}{hint}", file=sys.stderr)
                if not interactive:
                    return 1
                continue
            if stopped:
                stdout.write(" [interrupted]")
            stdout.write("\n")
            status = session.status()
            stdout.write(f"\x1b[2m{status}\x1b[0m\n" if dim else f"{status}\n")
            stdout.flush()
    finally:
        _restore_signals(hangup)
        if history_dir is not None:
            try:
                saved = save_history(session, history_dir)
            except OSError as exc:
                print(f"edgemerge: could not save the conversation: {exc}", file=sys.stderr)
            else:
                if saved is not None:
                    print(f"(conversation saved to {saved})", file=sys.stderr)


def _exit_on_hangup() -> dict[int, Any]:
    """A closed terminal (SIGHUP) or a kill (SIGTERM) ends the chat through its normal exit,
    so that the history is still saved."""

    def leave(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous: dict[int, Any] = {}
    for sig in (getattr(signal, "SIGHUP", None), signal.SIGTERM):
        if sig is None:
            continue
        try:
            previous[sig] = signal.signal(sig, leave)
        except ValueError:  # not the main thread
            break
    return previous


def _restore_signals(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
