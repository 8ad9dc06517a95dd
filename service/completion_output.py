"""One text completion choice's output: the echoed prompt, the text, and where each token's text starts.

OpenAI's `text_offset` of a token is the character at which its text starts in the choice's text,
the echoed prompt counted. A token may end in the middle of a character (byte tokens), and the text
holds that character once its last byte has arrived; so the offsets are counted by decoding the
tokens' bytes as the engine's detokenizer does (service/detokenizer.py), and a token that only
starts a character begins where the next one does. Text after a stop string is cut from the text,
and the token that completed the stop string keeps its offset.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field

from service.engine.sequence import SequenceUpdate, TokenLogprob


@dataclass
class CompletionOutput:
    """Collects one choice's updates."""

    index: int
    echo: str = ""  # the prompt's text, when the request echoes it
    texts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0

    def __post_init__(self) -> None:
        self._characters = len(self.echo)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, update: SequenceUpdate) -> list[int]:
        """Takes the update; returns the text offsets of the tokens it carries logprobs of."""
        self.texts.append(update.text)
        self.completion_tokens = update.completion_tokens
        if update.finish_reason is not None:
            self.finish_reason = update.finish_reason
        offsets = []
        for entry in update.logprobs or ():
            offsets.append(self._characters)
            self._characters += len(self._decoder.decode(entry.token_bytes))
        self.logprobs.extend(update.logprobs or ())
        self.offsets.extend(offsets)
        return offsets

    def text(self) -> str:
        return self.echo + "".join(self.texts)
