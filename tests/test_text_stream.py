"""TextStream, the one text stream of every path, against the two loops it replaced, piece for piece: the
Engine's (str, pending bytes, stop strings looked for where a token could complete them) and the drop-in's
copy of llama-cpp-python's (bytes re-detokenized whole, its multibyte_fix, chunks per token with logprobs)."""

from hypothesis import given, settings
from hypothesis import strategies as st

from pyllama_ssm.output import STOCK, TextStream, complete_text, incomplete_tail, stop_hold

SNOW, SMILE, E_ACUTE = "☃".encode(), "😀".encode(), "é".encode()
# token pieces: plain text, parts of stop strings, characters split anywhere, bytes that are never text
PIECES = [b"a", b"b", b"ab", b" ", b"\n", b"END", b"EN", b"D", b"x", SNOW, SNOW[:1], SNOW[1:], SNOW[:2],
          SNOW[2:], SMILE[:3], SMILE[3:], SMILE, E_ACUTE[:1], E_ACUTE[1:], b"\x80", b"\xff", b"a" + SNOW[:1]]
STOPS = ["END", "b", "ab\n", "☃", "é!", "\n\n", "xx", "D"]


class Vocab:
    """Model's token_text / token_to_piece over a list of pieces (token = index)."""

    def token_text(self, token: int):
        try:
            return PIECES[token].decode("utf-8")
        except UnicodeDecodeError:
            return None

    def token_to_piece(self, token: int) -> bytes:
        return PIECES[token]


def engine_before(tokens: list[int], stops: list[str]):
    """runner.py's sample/emit/flush as they were: (chunk texts, final text, stopped)."""
    vocab, text, pending, emitted, chunks = Vocab(), "", b"", 0, []

    def emit(final: bool = False):
        nonlocal emitted
        hold = 0 if final or not stops else stop_hold(text, stops)
        upto = max(emitted, len(text) - hold)
        chunks.append(text[emitted:upto])
        emitted = upto

    for tok in tokens:
        if pending or (piece := vocab.token_text(tok)) is None:
            piece, pending = complete_text(pending + vocab.token_to_piece(tok))
        text += piece
        for s in stops:
            at = text.find(s, max(0, emitted - len(s)))
            if at >= 0:
                text = text[:at]
                emit(final=True)
                return chunks, text, True
        emit()
    if emitted < len(text):  # flush
        chunks.append(text[emitted:])
    return chunks, text, False


def engine_now(tokens: list[int], stops: list[str]):
    vocab, stream, chunks = Vocab(), TextStream(stops), []
    for tok in tokens:
        chunks.append(stream.add(tok, vocab))
        if stream.stopped:
            return chunks, stream.text, True
    stream.finish()
    if rest := stream.take():
        chunks.append(rest)
    return chunks, stream.text, False


def stock_before(tokens: list[int], stops: list[str], max_tokens: int, eog: bool, logprobs: bool, room: int):
    """llama.py's _direct_completion text handling and _StreamText as they were: (streamed (text, offset)
    pairs, final text, finish reason)."""
    stop_bytes = [s.encode() for s in stops]
    sent = tokens_sent = 0
    out = []

    def stream(text: bytes, final: bool):
        nonlocal sent, tokens_sent
        safe_end = len(text) if final else len(text) - stop_hold(text, stop_bytes)
        if not logprobs:
            end = safe_end if final else safe_end - incomplete_tail(text[:safe_end])
            if end > sent:
                if piece := text[sent:end].decode("utf-8", errors="ignore"):
                    out.append((piece, None))
                sent = end
            return
        while tokens_sent < len(completion):
            piece = PIECES[completion[tokens_sent]]
            if final:
                if sent >= len(text):
                    return
                shown = piece[: len(text) - sent]
            elif sent + len(piece) > safe_end:
                return
            else:
                shown = piece
            out.append((shown.decode("utf-8", errors="ignore"), len(text[:sent].decode("utf-8", "ignore"))))
            sent, tokens_sent = sent + len(piece), tokens_sent + 1

    completion: list[int] = []
    text, finish_reason, multibyte_fix = b"", "length", 0
    for token in tokens + ([-1] if eog else []):
        if token == -1:
            text, finish_reason = b"".join(PIECES[t] for t in completion), "stop"
            break
        completion.append(token)
        all_text = b"".join(PIECES[t] for t in completion)
        for k, char in enumerate(all_text[-3:]):
            k = 3 - k
            for num, pattern in ((2, 192), (3, 224), (4, 240)):
                if num > k and pattern & char == pattern:
                    multibyte_fix = num - k
        if multibyte_fix > 0 and len(completion) < room:
            multibyte_fix -= 1
            continue
        hits = [s for s in stop_bytes if s in all_text]
        if hits:
            text, finish_reason = all_text[: all_text.index(hits[0])], "stop"
            break
        stream(all_text, False)
        if len(completion) >= max_tokens:
            text = b"".join(PIECES[t] for t in completion)
            break
    stream(text, True)
    return out, text, finish_reason


def stock_now(tokens: list[int], stops: list[str], max_tokens: int, eog: bool, logprobs: bool, room: int):
    stream, out, completion = TextStream(stops, policy=STOCK), [], []

    def send():
        if not logprobs:
            if piece := stream.take():
                out.append((piece, None))
            return
        out.extend((shown, offset) for _, shown, offset in stream.by_token(completion, PIECES.__getitem__))

    finish_reason = "length"
    for token in tokens + ([-1] if eog else []):
        if token == -1:
            stream.finish(b"".join(PIECES[t] for t in completion))
            finish_reason = "stop"
            break
        completion.append(token)
        if not stream.update(b"".join(PIECES[t] for t in completion), can_wait=len(completion) < room):
            continue
        if stream.stopped:
            finish_reason = "stop"
            break
        send()
        if len(completion) >= max_tokens:
            stream.finish()
            break
    else:
        stream.finish(b"")
    send()
    return out, stream.text, finish_reason


tokens_st = st.lists(st.integers(0, len(PIECES) - 1), max_size=24)
stops_st = st.lists(st.sampled_from(STOPS), max_size=3)


@settings(max_examples=600, deadline=None)
@given(tokens_st, stops_st)
def test_engine_policy_streams_as_the_engine_did(tokens, stops):
    assert engine_now(tokens, stops) == engine_before(tokens, stops)


@settings(max_examples=600, deadline=None)
@given(tokens_st, st.lists(st.sampled_from(STOPS + [""]), max_size=3), st.integers(1, 30), st.booleans(),
       st.booleans(), st.integers(1, 40))
def test_stock_policy_streams_as_llama_cpp_python_does(tokens, stops, max_tokens, eog, logprobs, room):
    assert stock_now(tokens, stops, max_tokens, eog, logprobs, room) == \
        stock_before(tokens, stops, max_tokens, eog, logprobs, room)


def test_a_stop_string_split_over_tokens_and_characters():
    vocab = Vocab()
    stream = TextStream(["☃!"])
    assert [stream.add(PIECES.index(p), vocab) for p in (b"a", SNOW[:1], SNOW[1:])] == ["a", "", ""]
    assert stream.add(PIECES.index(b"x"), vocab) == "☃x" and not stream.stopped
    stream = TextStream(["END"])
    assert [stream.add(PIECES.index(p), vocab) for p in (b"x", b"EN", b"D")] == ["x", "", ""]
    assert stream.stopped and stream.text == "x"
