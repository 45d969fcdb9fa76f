"""Incremental detokenization with stop strings: text deltas that never split a character or leak a stop string."""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns generated tokens into text deltas.

    Decoding token by token breaks multi-byte characters and some tokenizers' spacing, so each step
    decodes a short span starting a few tokens back and emits only what extends the previous text.
    Text that could still become a stop string is held back until it is clearly not one.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.tokens: list[int] = []
        self.prefix = 0  # decoding starts here, so leading-space rules see the same context twice
        self.read = 0  # tokens up to here are already in self.text
        self.text = ""  # text decoded so far
        self.emitted = 0  # length of self.text already handed out
        self.stopped = False

    def _decode(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True))

    def add(self, token: int) -> str:
        """Feed one token; returns the new text safe to show (possibly empty)."""
        self.tokens.append(token)
        old = self._decode(self.tokens[self.prefix : self.read])
        new = self._decode(self.tokens[self.prefix :])
        if len(new) > len(old) and not new.endswith(REPLACEMENT):  # else: a character is still incomplete
            self.text += new[len(old) :]
            self.prefix, self.read = self.read, len(self.tokens)
        return self._release()

    def _release(self, final: bool = False) -> str:
        cut = len(self.text)
        for s in self.stop:
            i = self.text.find(s)
            if i != -1 and i < cut:
                cut, self.stopped = i, True
        if self.stopped:
            self.text = self.text[:cut]
        elif not final:
            cut = len(self.text) - self._partial_stop_len()
        delta = self.text[self.emitted : max(cut, self.emitted)]
        self.emitted += len(delta)
        return delta

    def _partial_stop_len(self) -> int:
        """Length of the longest text suffix that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:n]):
                    best = max(best, n)
                    break
        return best

    def flush(self) -> str:
        """At the end of generation: release held-back text that did not become a stop string."""
        if self.read < len(self.tokens) and not self.stopped:
            old = self._decode(self.tokens[self.prefix : self.read])
            self.text += self._decode(self.tokens[self.prefix :])[len(old) :]
            self.read = len(self.tokens)
        return self._release(final=True)
