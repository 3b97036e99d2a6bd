"""The one UTF-8 rule of every streaming path: only an incomplete last character waits."""

from pyllama_ssm.text import complete_text, incomplete_tail


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
