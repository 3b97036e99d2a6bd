"""The runner: a step's plan (scheduler.plan_step) into one batch, and the rows its logits fill back
into tokens, logprobs and streamed text.

It decides nothing: which sequences feed what comes from the plan, what a finished request leaves
behind from the Engine.  sample() says when a request ends (its finish reason) and the Engine finishes it.
"""

from __future__ import annotations

import collections

from ..batch import Batch
from ..context import Context
from ..model import Model
from ..output import token_logprobs
from .request import NO_TOKEN, Chunk
from .scheduler import StepPlan
from .sequence import Slot
from .speculative import Speculator
from .trace import Trace

Rows = tuple[
    list[tuple[Slot, int]],        # (slot, batch index) whose logits sample a token
    dict[int, list[int]],          # seq -> batch indices of its draft tokens' logits
    list[tuple[Slot, int]],        # (slot, prompt tokens in this step)
    list[tuple[Slot, int, int]],   # (slot, first batch index, n): prompt logprobs
]


class Runner:
    def __init__(self, ctx: Context, model: Model, batch: Batch, speculator: Speculator,
                 counters: collections.Counter, trace: Trace):
        self.ctx, self.model, self.batch, self.speculator = ctx, model, batch, speculator
        self.n_ctx = ctx.n_ctx
        self.counters = counters  # the Engine's: "generated"
        self.trace = trace
        self._greedy = None  # this step's greedy tokens: (argmax per row from row lo, lo, batch index -> row)

    def fill(self, plan: StepPlan, running: dict[int, Slot]) -> Rows:
        """The batch of this step: each decoding sequence's sampled token and the draft tokens it may
        verify (taken from slot.draft), then the prompt chunks; and which rows of its logits go where."""
        batch = self.batch
        batch.clear()
        outputs: list[tuple[Slot, int]] = []
        verify: dict[int, list[int]] = {}
        prefill: list[tuple[Slot, int]] = []
        scored: list[tuple[Slot, int, int]] = []
        if plan.drafts:  # each sampled token, then the draft tokens it verifies
            for i, seq in enumerate(plan.decode):
                slot = running[seq]
                outputs.append((slot, batch.add(slot.next_token, slot.pos, slot.seq, logits=True)))
                draft, slot.draft = slot.draft[:plan.drafts[i]], []
                if draft and self.speculator.begin(slot, draft):
                    verify[seq] = [batch.add(t, slot.pos + 1 + k, seq, logits=True) for k, t in enumerate(draft)]
        elif plan.decode:  # the sampled tokens alone: one row each, written at once
            slots = [running[seq] for seq in plan.decode]
            first = batch.add_rows([s.next_token for s in slots], [s.pos for s in slots], plan.decode)
            outputs = list(zip(slots, range(first, first + len(slots))))
            for slot in slots:
                if slot.draft:  # one not verified this step is proposed again
                    slot.draft = []
        for chunk in plan.prefill:
            slot = running[chunk.seq]
            tokens = slot.req.prompt[chunk.start:chunk.start + chunk.n]
            if chunk.all_logits:
                scored.append((slot, batch.n_tokens, chunk.n))
                for k, t in enumerate(tokens):
                    last = batch.add(t, slot.pos + k, slot.seq, logits=True)
            else:
                last = batch.add_sequence(tokens, slot.pos, slot.seq, logits_last=chunk.last)
            prefill.append((slot, chunk.n))
            if chunk.last:
                outputs.append((slot, last))
        return outputs, verify, prefill, scored

    def decoded(self, outputs: list[tuple[Slot, int]], verify: dict[int, list[int]]) -> None:
        """After the step's decode: the greedy sequences' tokens (each row's first maximum, as Sampler's
        own greedy path picks) in one numpy pass over the rows they span rather than one per row.  The
        rows come from memory (the decode copied them out past the caches): that read is most of the
        time, and finding the maxima inside llama_decode instead saved nothing on a CPU (tried)."""
        self._greedy = None
        greedy = [(slot, i) for slot, i in outputs if slot.sampler.greedy]
        if not greedy:
            return
        idx = [i for _, i in greedy] + [i for slot, _ in greedy for i in verify.get(slot.seq, ())]
        if len(idx) < 2:
            return
        rows = self.batch.output_rows()  # None: row = batch index
        lo, hi = (min(idx), max(idx)) if rows is None else (int(rows[min(idx)]), int(rows[max(idx)]))
        self._greedy = (self.ctx.all_logits(hi + 1)[lo:].argmax(axis=1).tolist(), lo, rows)

    def sample(self, slot: Slot, idx: int) -> str | None:
        """Sample slot's next token from the logits of batch row idx and stream its text; the finish
        reason when it ends the request, else None (the token is fed next step)."""
        req, gen = slot.req, slot.gen
        # logprobs are the model's: a copy when a logits processor will rewrite the buffer in place
        raw = None if req.n_logprobs is None else self.ctx.logits(idx, copy=req.params.logits_processor is not None)
        if self._greedy is not None and slot.sampler.greedy:
            best, lo, rows = self._greedy
            tok = best[(idx if rows is None else rows[idx]) - lo]
        else:
            tok = slot.sampler.sample(self.ctx.ptr, idx)
        if req.continues is not None and req.continues.stop is not None and req.continues.stop(gen.tokens):
            return "stop"  # stock's stopping criteria: the request ends without the token
        self.counters["generated"] += 1
        if raw is not None:
            lp, top = token_logprobs(raw, tok, req.n_logprobs)
            gen.logprobs.append(lp)
            gen.top_logprobs.append(top)
        gen.tokens.append(tok)
        gen.usage.completion_tokens += 1
        if self.trace.on and len(gen.tokens) == 1:
            self.trace.event("first", req=req.id)
        if self.model.is_eog(tok):
            return "stop"
        stream = gen.stream  # the text that may go out: a tail that could become a stop string waits
        text = stream.add(tok, self.model)
        req._push(Chunk(tok, text) if raw is None else Chunk(tok, text, gen.logprobs[-1], gen.top_logprobs[-1]))
        if stream.stopped:
            return "stop"
        if len(gen.tokens) >= req.max_tokens or slot.pos + 1 >= self.n_ctx:
            return "length"
        slot.next_token = tok
        return None

    def sample_live(self, slot: Slot) -> str | None:
        """sample() from the context's last logits row, which a continued request's resident prompt left
        there (request.Continuation.live)."""
        self._greedy = None  # another step's
        return self.sample(slot, -1)

    def keep_logits(self, slot: Slot, idx: int) -> None:
        """Hand batch row idx, the logits after the token slot fed last (position slot.pos - 1), to a
        continued request that keeps every position's (logits_all: req.keeps_logits)."""
        slot.req.continues.on_logits(slot.pos - 1, self.ctx.logits(idx, copy=False))

    def score_prompt(self, slot: Slot, first: int, n: int) -> None:
        """Batch rows first..first+n-1 hold the logits after prompt tokens cursor..cursor+n-1:
        they score the prompt tokens one position later (and go to a continued request's on_logits)."""
        req, gen = slot.req, slot.gen
        if req.keeps_logits:
            for k in range(n):
                req.continues.on_logits(slot.cursor + k, self.ctx.logits(first + k, copy=False))
        if not req.score_prompt:
            return
        for k in range(n):
            target = slot.cursor + k + 1
            if target < len(req.prompt):
                gen.prompt_logprobs[target], gen.prompt_top_logprobs[target] = token_logprobs(
                    self.ctx.logits(first + k, copy=False), req.prompt[target], req.n_logprobs or 0)

    def flush(self, slot: Slot) -> None:
        """Stream the text held back, the request having ended without a stop string in it."""
        stream = slot.gen.stream
        stream.finish()
        if text := stream.take():
            slot.req._push(Chunk(NO_TOKEN, text))
