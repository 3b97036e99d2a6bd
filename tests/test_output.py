"""The one UTF-8 rule of every streaming path: only an incomplete last character waits."""

import numpy as np

from pyllama_ssm.output import complete_text, incomplete_tail, log_softmax, stop_hold, token_logprobs, top_logprobs


def test_only_the_incomplete_last_character_waits():
    snow = "☃".encode()  # 3 bytes
    assert complete_text(b"ab" + snow[:2]) == ("ab", snow[:2])
    assert complete_text(snow[:2] + snow[2:] + b"c") == ("☃c", b"")
    # a byte that can never start a character is dropped; what follows it is not held back
    assert complete_text(b"\x80" + "é".encode() + b"x") == ("éx", b"")
    assert complete_text("😀".encode()[:3] + b"z") == ("z", b"")  # cut off by a plain byte: dropped
    assert [incomplete_tail(b) for b in (b"", b"a", "é".encode()[:1], "😀".encode()[:3], "😀".encode())] == \
        [0, 0, 1, 3, 0]


def test_text_streams_as_soon_as_its_bytes_are_complete():
    """Tokens that each end inside a character and complete the previous one: nothing waits for the end."""
    pieces = ["a☃".encode()[:3], "a☃".encode()[3:] + "é".encode()[:1], "é".encode()[1:] + b"!"]
    pending, out = b"", []
    for piece in pieces:
        text, pending = complete_text(pending + piece)
        out.append(text)
    assert out == ["a", "☃", "é!"] and pending == b""


def test_stop_hold_keeps_only_a_tail_that_can_still_become_a_stop_string():
    assert stop_hold("Hello wor", ["world"]) == 3 and stop_hold("Hello", ["world"]) == 0
    assert stop_hold("a\n\n", ["\n\n\n", "END"]) == 2 and stop_hold(b"xEN", [b"END"]) == 2
    assert stop_hold("anything", []) == 0


def test_top_logprobs_is_the_full_sort_without_sorting_the_vocabulary():
    rng = np.random.default_rng(0)
    for _ in range(200):
        row = log_softmax(rng.integers(0, 5, size=50).astype(np.single))  # many ties
        k = int(rng.integers(0, 60))
        full = np.lexsort((-np.arange(len(row)), -row))[:k]  # ties to the higher id
        assert top_logprobs(row, k) == [(int(t), float(row[t])) for t in full]
    lp, top = token_logprobs(np.array([0.0, 1.0, 1.0], dtype=np.single), 0, 2)
    assert list(top) == [2, 1] and abs(lp - float(np.log(1 / (1 + 2 * np.e)))) < 1e-6
