"""The serving layer: N sequences of one model on one context.

    core.py          the Engine: the thread that owns the context, its loop, and the life of a request
                     (admission, finish, preemption), carrying out the decisions of the two pure modules:
    scheduler.py     batch composition, who waits for whose prefix, who is swapped out
    retention.py     which prompt prefixes the prefix cache keeps and which it gives up
    runner.py        a step's plan into one batch; the rows of its logits into tokens and streamed text
    speculative.py   draft tokens proposed, verified in the step, the rejected undone
    prefix_cache.py  prompt prefixes kept for later requests (recurrent snapshots, KV holders)
    request.py       what the caller holds and receives: Request, Chunk, Completion, Usage
    sequence.py      a running request's state: its sequence id, cursor, position, draft
    config.py        EngineConfig, and the Sizing of the context it implies
    reports.py       what the Engine reports: EngineStats, EngineMemory, SlotView, PrefixEntryView
    trace.py         the PYLLAMA_SSM_TRACE timeline

`from pyllama_ssm.engine import Engine, EngineConfig` is the public entry.
"""

from .config import EngineConfig  # noqa: F401
from .core import Engine  # noqa: F401
from .reports import EngineMemory, EngineStats, PrefixEntryView, SlotView  # noqa: F401
from .request import Chunk, Completion, Request, Usage  # noqa: F401

__all__ = ["Chunk", "Completion", "Engine", "EngineConfig", "EngineMemory", "EngineStats", "PrefixEntryView",
           "Request", "SlotView", "Usage"]
