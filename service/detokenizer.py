"""Incremental, UTF-8-safe detokenization.

A token is a piece of bytes, and a multi-byte character may be split over several tokens (byte
fallback tokens such as <0xE2>). The incremental decoder emits a character only once all its
bytes have arrived, so a stream never carries half a character; invalid bytes become U+FFFD.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable


class IncrementalDetokenizer:
    """Turns a sequence's tokens into text, one token at a time."""

    def __init__(self, token_bytes: Callable[[int], bytes]) -> None:
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        """The text that becomes complete with this token (often empty for a partial character)."""
        return self._decoder.decode(self._token_bytes(token))

    def flush(self) -> str:
        """Whatever an unfinished character left behind, as U+FFFD, at the end of generation."""
        return self._decoder.decode(b"", final=True)
