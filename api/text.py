"""Incremental detokenization with stop strings: what text may be streamed so far.

Each new token re-decodes the whole completion (byte-level BPE decodes are stable under
appending, and the text stays short), then releases everything except (a) a trailing
partial UTF-8 character and (b) the longest tail that could still grow into a stop
string. A stop string that appears ends the text just before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

REPLACEMENT = "\ufffd"  # what a partial UTF-8 sequence decodes to


@dataclass
class StopText:
    tokenizer: Any
    stop: tuple[str, ...] = ()
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded text already released
    stopped: bool = False

    def push(self, token_id: int) -> str:
        """Add one generated token; returns the new text that may be released (maybe
        ""). Sets `stopped` when a stop string appeared (its text is never released)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            start = max(0, self.sent - max(len(s) for s in self.stop))
            hits = [i for s in self.stop if (i := text.find(s, start)) >= 0]
            if hits:
                self.stopped = True
                return self._release(text, max(self.sent, min(hits)))
        end = len(text.rstrip(REPLACEMENT))
        return self._release(text, end - self._held(text[:end]))

    def flush(self) -> str:
        """The end of the generation (length or end of sequence): release what was held
        back for a stop string that never came."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._release(text, len(text))

    def _held(self, text: str) -> int:
        """Length of the longest tail of `text` (after what was sent) that is a proper
        prefix of a stop string."""
        longest = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(text) - self.sent), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def _release(self, text: str, end: int) -> str:
        if end <= self.sent:
            return ""
        out = text[self.sent : end]
        self.sent = end
        return out
