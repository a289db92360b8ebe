"""Stop-string detection during generation, by decoding a short window of the newest tokens.

A stop string of c characters is produced by at most c tokens that emit text plus, per character, up to
three tokens that emit only UTF-8 continuation bytes, so the last 4c + 4 tokens always cover it. Each new
token is checked as it arrives; the first token whose window contains a stop string ends the sequence and
is the last token returned (stop tokens are included in the output: protocol doc §2.6, "How stop tokens
appear in the output"). Only generated text is searched, never the prompt.

The window is decoded as the model wrote it: a Hugging Face tokenizer whose config sets
`clean_up_tokenization_spaces` (Llama 3's does) would otherwise strip the space before punctuation on
transformers 4.x ("it ." -> "it."), and a stop string " ." would never be seen. vLLM matches stop strings
against the raw text too.
"""

from __future__ import annotations

from typing import Protocol, Sequence


class Tokenizer(Protocol):
    def decode(self, token_ids: Sequence[int]) -> str: ...


def _raw_decode_kwargs(tokenizer: Tokenizer) -> dict:
    """{"clean_up_tokenization_spaces": False} where the tokenizer's decode takes it (Hugging Face's), else {}."""
    try:
        tokenizer.decode([], clean_up_tokenization_spaces=False)
    except TypeError:
        return {}
    return {"clean_up_tokenization_spaces": False}


class StopStrings:
    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str]):
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.window = 4 * max(len(s) for s in self.stops) + 4
        self._kw = _raw_decode_kwargs(tokenizer)

    def hit(self, generated: Sequence[int]) -> bool:
        """True when the text of `generated` (all tokens so far, newest last) now contains a stop string."""
        text = self.tokenizer.decode(list(generated[-self.window:]), **self._kw)
        return any(s in text for s in self.stops)
