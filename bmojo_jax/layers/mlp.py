"""SwiGLU feed-forward (Shazeer 2020): [b, t, d_model] -> [b, t, d_model]."""

from __future__ import annotations

import jax
from flax import nnx


class SwiGLU(nnx.Module):
    """out = W_down (SiLU(W_gate x) * W_up x); hidden width `hidden`. No biases."""

    def __init__(self, d_model: int, hidden: int, *, dtype, rngs: nnx.Rngs):
        self.gate = nnx.Linear(d_model, hidden, use_bias=False, dtype=dtype, rngs=rngs)
        self.up = nnx.Linear(d_model, hidden, use_bias=False, dtype=dtype, rngs=rngs)
        self.down = nnx.Linear(hidden, d_model, use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
