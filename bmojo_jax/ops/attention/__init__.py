"""Causal attention over B'MOJO's memory (`memory_attention`), decode-time attention
(`attend_one`) and rotary position embeddings (`rope`).

One folder per op (docs/design.md section 4; layout as in `bmojo_jax.ops.ssm`):
    api.py             the entry points: argument checks, implementation table, docstrings.
    reference.py       the oracle (dense [t, t] masks, float32 softmax).
    xla.py             the block-sparse implementation (`xla`).
    pallas.py          the thin entry point into `pallas_kernels`, imported only when picked.
    attention_test.py  one test class over every implementation against the reference.
"""

from bmojo_jax.ops.attention.api import IMPLEMENTATIONS, attend_one, memory_attention, rope

__all__ = ["IMPLEMENTATIONS", "attend_one", "memory_attention", "rope"]
