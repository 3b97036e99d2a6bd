"""Text from token bytes: one rule for every path that streams text (the Engine, the drop-in Llama).

A token's bytes may end inside a multi-byte UTF-8 character that the next token completes; only that
incomplete tail waits, everything before it goes out at once.
"""

from __future__ import annotations


def incomplete_tail(data: bytes) -> int:
    """How many bytes at the end of data start a multi-byte UTF-8 character that more bytes may complete."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 == 0x80:  # continuation byte: its lead is further back
            continue
        need = 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
        return back if back < need else 0
    return 0


def complete_text(data: bytes) -> tuple[str, bytes]:
    """(the text of data up to an incomplete last character, the bytes held back); bytes that can never
    form a character are dropped, as llama-cpp-python's errors="ignore" does."""
    end = len(data) - incomplete_tail(data)
    return data[:end].decode("utf-8", errors="ignore"), data[end:]
