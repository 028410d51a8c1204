"""The `reference` implementation of `linear_cross_entropy`: the logits [b, t, V] in full, optax's
cross-entropy, autodiff. The oracle.

Implementation signature (shared by every implementation of the op, see `api`):
    (hidden [b,t,d], head [V,d], targets int32 [b,t], token_weights float32 [b,t], chunk_size)
        -> float32 scalar
"""

from __future__ import annotations

import jax.numpy as jnp
import optax


def linear_cross_entropy(hidden, head, targets, token_weights, chunk_size):
    """sum_bt token_weights * nll, from the full float32 logits (chunk_size unused)."""
    del chunk_size
    logits = jnp.einsum("btd,vd->btv", hidden.astype(jnp.float32), head.astype(jnp.float32))
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(token_weights * nll)
