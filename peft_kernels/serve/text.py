"""Incremental text of a request's tokens, and its stop strings."""
from __future__ import annotations

from typing import Sequence


class TextStream:
    """The text of one request's generated tokens, handed out piece by piece.

    Semantics: the text is the tokenizer's decoding of every generated token so far (special
    tokens skipped); a piece is released once no stop string can still begin inside it and it does
    not end in a partial character; at the first stop string the text ends just before it. With
    ``incremental`` False and no stop strings nothing is decoded before :meth:`finish` (a client
    that reads the whole response at the end), so a step costs no decoding.
    """

    def __init__(self, tokenizer, stop: Sequence[str], incremental: bool = True):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.incremental = incremental or bool(self.stop)
        self.sent = 0
        self.stopped = False

    def push(self, token_ids: Sequence[int]) -> str:
        """The new piece of text after ``token_ids`` (every token generated so far); sets ``stopped``
        when a stop string appeared (the piece then ends where the text ends)."""
        if not self.incremental:
            return ""
        text = self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
        start = max(0, self.sent - self._hold)
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(text[:min(hits)])
        safe = len(text) - self._hold
        while safe > self.sent and text[safe - 1] == "\ufffd":
            safe -= 1
        return self._release(text[:safe]) if safe > self.sent else ""

    def finish(self, token_ids: Sequence[int]) -> str:
        """The rest of the text at the end of the request (nothing after a stop string)."""
        if self.stopped:
            return ""
        return self._release(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))

    def _release(self, text: str) -> str:
        piece = text[self.sent:]
        self.sent = max(self.sent, len(text))
        return piece
