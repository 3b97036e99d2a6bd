"""What llama.cpp accepts for each numeric request input: one table for the Python API and the server.

llama.cpp takes these values as C int32_t and float: an int past int32 makes cffi raise
OverflowError (deep in the Engine's thread, where it once lost the request), a float past
float32's range turns into inf, and NaN or inf reach the sampler's arithmetic. Each input is
checked once, at the edge, against its range here; the server's schemas state the same ranges
(`field()`), so the published contract is the enforced one.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

INT32_MAX = 2**31 - 1
FLOAT_MAX = 3.4028234663852886e38  # the largest float32: past it a C float is inf


@dataclass(frozen=True)
class Range:
    lo: float
    hi: float
    integer: bool = False
    lo_open: bool = False  # lo itself excluded

    def describe(self) -> str:
        if self.integer:
            return f"an int in {self.lo}..{self.hi}"
        return f"a number in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}]"

    def check(self, name: str, value: Any) -> int | float:
        """value as an int or float inside the range, else ValueError naming name and the range."""
        try:
            if self.integer:
                if isinstance(value, float):
                    raise TypeError
                value = operator.index(value)
            else:
                value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}={value!r}: must be {self.describe()}") from None
        inside = (self.lo < value if self.lo_open else self.lo <= value) and value <= self.hi
        if not inside or (not self.integer and math.isnan(value)):
            raise ValueError(f"{name}={value!r}: must be {self.describe()}")
        return value

    def field(self) -> dict[str, float]:
        """The bounds as pydantic Field keywords (they also go to the OpenAPI schema)."""
        return {"gt" if self.lo_open else "ge": self.lo, "le": self.hi}


def _number(lo: float = -FLOAT_MAX, hi: float = FLOAT_MAX, lo_open: bool = False) -> Range:
    return Range(lo, hi, lo_open=lo_open)


def _int(lo: int, hi: int = INT32_MAX) -> Range:
    return Range(lo, hi, integer=True)


LIMITS: dict[str, Range] = {
    # sampling (SamplingParams); temperature < 0 samples the plain seeded distribution, 0 is greedy
    "temperature": _number(),
    "top_k": _int(0),                     # 0: the whole vocabulary
    "top_p": _number(0.0, 1.0),
    "min_p": _number(0.0, 1.0),
    "typical_p": _number(0.0, 1.0, lo_open=True),
    "repeat_penalty": _number(0.0, lo_open=True),
    "frequency_penalty": _number(),
    "presence_penalty": _number(),
    "penalty_last_n": _int(-1),           # -1: the whole context, 0: no penalties
    "mirostat_mode": _int(0, 2),
    "mirostat_tau": _number(0.0),
    "mirostat_eta": _number(0.0),
    "logit_bias": _number(),              # each bias; -inf (bans the token) is allowed on top
    "n_probs": _int(0, 1024),             # llama-server's /completion: a JSON entry per top token and generated token
    "seed": Range(-2**63, 2**64 - 1, integer=True),  # taken modulo 2**32, as llama.cpp's uint32_t
    # per request
    "max_tokens": _int(0),
    "min_tokens": _int(0),
    "logprobs": _int(0),                  # at most the vocabulary, checked where the model is known
    "top_logprobs": _int(0, 20),
    "token": _int(0),                     # token ids: below n_vocab, checked where the model is known
}


def check(name: str, value: Any, limit: str | None = None) -> int | float:
    """value checked against LIMITS[limit or name]; the error names `name` and the range."""
    return LIMITS[limit or name].check(name, value)


def field(name: str, **narrower: float) -> dict[str, float]:
    """Pydantic Field bounds of LIMITS[name], with narrower ones a route adds (ge=-2.0, le=2.0...)."""
    bounds = LIMITS[name].field()
    for key, value in narrower.items():
        bounds.pop("gt" if key == "ge" else "ge" if key == "gt" else "", None)
        bounds[key] = value
    return bounds
