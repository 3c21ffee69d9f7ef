"""Incremental detokenization: the text of a growing token list at a cost per step that does not grow with it.

vLLM's prefix/read offsets: each step decodes only the tokens since the last emission together with the tokens of
that emission (context, so a tokenizer that drops a leading space at the start of a decode, SentencePiece for
one, still gets the boundary right) and emits text only once it does not end in an incomplete UTF-8 character
(U+FFFD). The concatenated pieces equal one decode of all the tokens.
"""

from __future__ import annotations


class Detokenizer:
    """Text of a token list fed a few tokens at a time.

    >>> d = Detokenizer(tokenizer)                    # ids of "é" are two byte tokens in a byte-level BPE
    >>> d.push([first_byte_of_e_acute]), d.push([second_byte]), d.flush()
    ('', 'é', '')
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix, self.read = 0, 0   # ids[prefix:read]: the last emission (context); ids[read:]: not yet emitted

    def push(self, ids: list[int]) -> str:
        """Append ids; return the text that became final with them (may be empty)."""
        self.ids.extend(ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """What is held back at the end of the output (an incomplete character decodes to U+FFFD, as in a full
        decode)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix: self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]

    def _decode(self, ids: list[int]) -> str:
        # No space clean-up: it rewrites text across piece boundaries, so pieces would not add up to the whole.
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
