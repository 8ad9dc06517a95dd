"""Stop strings matched on the decoded text of a stream.

Text that could still be the start of a stop string is held back until the next piece of text
decides it, so a stop string is never emitted, not even in part, and the text before it always is.
"""

from __future__ import annotations


class StopStringMatcher:
    """Feeds decoded text in, gets back the text that is safe to emit."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        """Add text; return what can be emitted now. After a match, `matched` is set and the
        returned text ends where the stop string began."""
        if not self._stops:
            return text
        pending = self._pending + text
        first_at, first_stop = -1, None
        for stop in self._stops:
            at = pending.find(stop)
            if at != -1 and (first_at == -1 or at < first_at):
                first_at, first_stop = at, stop
        if first_stop is not None:
            self.matched = first_stop
            self._pending = ""
            return pending[:first_at]
        hold = self._held_suffix_length(pending)
        self._pending = pending[len(pending) - hold :] if hold else ""
        return pending[: len(pending) - hold]

    def flush(self) -> str:
        """The held-back text, at the end of generation when no stop string can complete."""
        pending, self._pending = self._pending, ""
        return pending

    def _held_suffix_length(self, text: str) -> int:
        # The longest suffix of `text` that is a proper prefix of some stop string.
        longest = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
