"""LlamaTokenizer: the model's own tokenizer, as llama_cpp.llama_tokenizer offers it.

Llama.tokenizer() and Llama.tokenizer_ return it; it holds the model, not the
Llama, so it needs nothing of the drop-in's state.  pyllama_ssm.llama
re-exports it, where llama-cpp-python's users import it from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from .llama import Llama


class LlamaTokenizer:
    """The model's own tokenizer, with llama-cpp-python's byte-level detokenize."""

    def __init__(self, llama: "Llama"):
        self._model = llama._core_model

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = True) -> list[int]:
        if not isinstance(text, (bytes, bytearray)):
            raise TypeError(f"tokenize: text must be bytes (utf-8), got {type(text).__name__}")
        self._model.ptr  # raises once the model is closed: its vocabulary is gone
        return self._model.tokenize(bytes(text), add_special=add_bos, parse_special=special)

    def detokenize(self, tokens: list[int], prev_tokens: Optional[list[int]] = None, special: bool = False) -> bytes:
        self._model.ptr  # raises once the model is closed
        out = b"".join(self._model.token_to_piece(int(t), special=special) for t in tokens)
        # SPM vocabularies put a space before the first word: drop it after BOS, as llama-cpp-python does
        if len(tokens) > 0 and tokens[0] == self._model.token_bos and out[:1] == b" ":
            out = out[1:]
        return out

    def encode(self, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
        return self.tokenize(text.encode("utf-8", errors="ignore"), add_bos=add_bos, special=special)

    def decode(self, tokens: list[int]) -> str:
        return self.detokenize(tokens).decode("utf-8", errors="ignore")

    def eog_tokens(self) -> tuple[int, ...]:
        """Every end-of-generation token (not stock's: the server's ignore_eos rules them all out)."""
        return self._model.eog_tokens
