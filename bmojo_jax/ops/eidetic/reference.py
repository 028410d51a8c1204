"""The `reference` implementation of `select_eidetic`: every chunk's buffer rebuilt from all past
selections (obviously correct, O(c^2)). The oracle.

Implementation signature (shared by every implementation of the op, see `api`):
    (positions int32 [b,c,k] (-1 = none), values float32 [b,c,k] (-inf = none), slots m, lag L,
     eviction "fifo" | "score") -> memory_positions int32 [b,c,m] (-1 = empty)
`positions` and `values` are each chunk's top-k (`api.chunk_topk`); the knobs are checked by `api`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def select(positions, values, slots, lag, eviction):
    """For each chunk: the selections of the chunks it may read (fifo: the newest m / k of them;
    score: all of them), padded to m slots, then (score) the top m by score."""
    b, c, k = positions.shape
    rows = []
    for chunk in range(c):
        last = chunk - lag  # newest chunk whose selections are visible
        first = 0 if eviction == "score" else last - slots // k + 1
        pos = positions[:, max(first, 0):max(last + 1, 0)].reshape(b, -1)
        val = values[:, max(first, 0):max(last + 1, 0)].reshape(b, -1)
        pad = slots - pos.shape[1]
        if pad > 0:
            pos = jnp.pad(pos, [(0, 0), (0, pad)], constant_values=-1)
            val = jnp.pad(val, [(0, 0), (0, pad)], constant_values=-jnp.inf)
        if eviction == "score":
            val, keep = jax.lax.top_k(val, slots)
            pos = jnp.take_along_axis(pos, keep, axis=1)
        rows.append(jnp.where(val > -jnp.inf, pos, -1))
    return jnp.stack(rows, axis=1)
