"""`edgemerge chat`: a streaming terminal chat with a GGUF model.

The chat keeps the conversation as a list of messages and renders it with the
model's own chat template (from the GGUF) on every turn; llama-cpp-python
reuses the evaluated prefix, so each turn only evaluates the new tokens.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TextIO

EXIT_COMMANDS = ("/exit", "/quit")


@dataclass
class ChatSession:
    """One conversation with a loaded ``llama_cpp.Llama``.

    Attributes:
        llm: the loaded model (``llama_cpp.Llama`` or ``edgemerge.Llama``).
        system: optional system prompt, sent first on every turn.
        max_tokens: limit on the length of one reply.
        temperature: sampling temperature (0 = greedy).
    """

    llm: object
    system: str | None = None
    max_tokens: int = 512
    temperature: float = 0.7
    seed: int | None = None
    messages: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.system:
            self.messages.append({"role": "system", "content": self.system})

    def send(self, text: str) -> Iterator[str]:
        """Add a user turn and stream the reply, piece by piece.

        The reply is appended to the history once complete, or with what was
        produced so far if the caller stops iterating (Ctrl-C).
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


def run_chat(session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """Read-eval-print loop: Ctrl-D or /exit ends it; Ctrl-C stops only the current reply."""
    interactive = stdin.isatty()
    if interactive:
        print("edgemerge chat: type a message; /exit or Ctrl-D to quit.", file=stdout)
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
        if text in EXIT_COMMANDS:
            return 0
        try:
            for piece in session.send(text):
                stdout.write(piece)
                stdout.flush()
        except KeyboardInterrupt:
            stdout.write(" [interrupted]")
        stdout.write("\n")
        stdout.flush()
