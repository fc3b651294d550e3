"""The conversion methods by name: one registry, so a name means the same thing in the command line, the
benchmarks, the demo and the lessons.  One file per method, each readable top to bottom: its steps, its rule for
a cache budget, its layer converter.

    exact      d_c + d_R = 2 n_kv d_h (F = 1 only)   TransMLA's identity: GQA's [K; V] cache is the latent
    transmla   d_R = min(DeepSeek's 64 or d_h/2, B/2), d_c = B − d_R
    mha2mla    r = B / (4 n_kv) rotary pairs per KV head (d_R = 2 r n_kv, half of B), d_c = B − d_R
    recipe     d_R = min(B/2, d_h) or min(B/3, d_h), whichever gives the converted model the lower KL to the source
               on the calibration tokens (``split_choice``); d_c = B − d_R
"""

from __future__ import annotations

from mla_ref._checks import require_choice
from mla_ref.convert.methods.base import Method, budget_elements
from mla_ref.convert.methods.exact import Exact
from mla_ref.convert.methods.mha2mla import MHA2MLA
from mla_ref.convert.methods.recipe import Recipe
from mla_ref.convert.methods.transmla import TransMLA

METHODS: dict[str, Method] = {method.name: method for method in (Exact(), TransMLA(), MHA2MLA(), Recipe())}
LOSSY_METHODS: tuple[str, ...] = tuple(name for name, method in METHODS.items() if method.lossy)


def get_method(name: str) -> Method:
    """The registered method called ``name`` (a clear error naming the allowed ones otherwise)."""
    require_choice("method", name, tuple(METHODS))
    return METHODS[name]


__all__ = ["LOSSY_METHODS", "METHODS", "Method", "budget_elements", "get_method"]
