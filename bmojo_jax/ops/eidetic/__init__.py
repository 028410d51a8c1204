"""Eidetic memory management: which past tokens each query chunk may read verbatim
(`select_eidetic`, `chunk_topk`, `Selection`, `document_starts` for packed documents,
`slots_filled`: how full a context of some length gets the buffer), and the
same bookkeeping one token at a time for decoding (`EideticState`, `init_state`, `state_after`,
`update`).

One folder per op (docs/design.md section 4; layout as in `bmojo_jax.ops.ssm`):
    api.py           the entry points: argument checks, implementation table, `Selection`.
    reference.py     the oracle (every chunk's buffer rebuilt from all past selections).
    xla.py           the sliding / scanning implementation (`xla`).
    streaming.py     the decoding state (docs/design.md section 5).
    eidetic_test.py  the implementations against the reference, causality, argument checks.
"""

from bmojo_jax.ops.eidetic.api import (IMPLEMENTATIONS, Selection, chunk_topk, document_starts,
                                       select_eidetic, select_whole_state, slots_filled)
from bmojo_jax.ops.eidetic.streaming import EideticState, Slots, init_state, state_after, update

__all__ = ["IMPLEMENTATIONS", "Selection", "chunk_topk", "document_starts", "select_eidetic",
           "select_whole_state", "slots_filled",
           "EideticState", "Slots", "init_state", "state_after", "update"]
