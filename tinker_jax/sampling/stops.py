"""Stop-string detection during generation, by decoding a short window of the newest tokens.

A stop string of c characters is produced by at most c tokens that emit text plus, per character, up to
three tokens that emit only UTF-8 continuation bytes, so the last 4c + 4 tokens always cover it. Each new
token is checked as it arrives; the first token whose window contains a stop string ends the sequence and
is the last token returned (stop tokens are included in the output: protocol doc §2.6, "How stop tokens
appear in the output"). Only generated text is searched, never the prompt.
"""

from __future__ import annotations

from typing import Protocol, Sequence


class Tokenizer(Protocol):
    def decode(self, token_ids: Sequence[int]) -> str: ...


class StopStrings:
    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str]):
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.window = 4 * max(len(s) for s in self.stops) + 4

    def hit(self, generated: Sequence[int]) -> bool:
        """True when the text of `generated` (all tokens so far, newest last) now contains a stop string."""
        text = self.tokenizer.decode(list(generated[-self.window:]))
        return any(s in text for s in self.stops)
