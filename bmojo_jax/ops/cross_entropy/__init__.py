"""Cross-entropy of a linear LM head without the [b, t, V] logits (`linear_cross_entropy`).

One folder per op (docs/design.md section 4; layout as in `bmojo_jax.ops.ssm`):
    api.py                  the entry point: argument checks, implementation table, docstring.
    reference.py            the oracle (full logits, autodiff).
    xla.py                  the chunked, fused implementation (`xla`).
    cross_entropy_test.py   one test class over every implementation against the reference.
"""

from bmojo_jax.ops.cross_entropy.api import DEFAULT_CHUNK, IMPLEMENTATIONS, linear_cross_entropy

__all__ = ["DEFAULT_CHUNK", "IMPLEMENTATIONS", "linear_cross_entropy"]
