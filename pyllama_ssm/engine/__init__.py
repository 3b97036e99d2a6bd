"""The serving layer: N sequences of one model on one context.

    core.py          the Engine: the thread that owns the context, runs the steps, and carries out
                     the scheduler's decisions (requests, streaming, speculative drafts, preemption)
    scheduler.py     its decisions from plain data: batch composition, who waits, who is swapped out
    retention.py     its prefix-cache decisions from plain data: which prefixes stay, which give way
    prefix_cache.py  prompt prefixes kept for later requests (recurrent snapshots, KV holders)

`from pyllama_ssm.engine import Engine, EngineConfig` is the public entry.
"""

from .core import (Chunk, Completion, Engine, EngineConfig, EngineMemory, EngineStats, PrefixEntryView,  # noqa: F401
                   Request, SlotView, Usage)

__all__ = ["Chunk", "Completion", "Engine", "EngineConfig", "EngineMemory", "EngineStats", "PrefixEntryView",
           "Request", "SlotView", "Usage"]
