"""The `xla` implementation of `select_eidetic`, O(c) (same signature as `reference`).

    fifo   the buffer of chunk c is the selections of chunks c-L-r+1 .. c-L (r = m / k): r copies
           of the selections, each delayed by a whole number of chunks, side by side.
    score  a `lax.scan` over chunks keeps a running top-m of (position, score); each step merges
           the selections of chunk c-L (ties go to the earlier selection: `lax.top_k` is stable).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _delay(x, chunks, fill):
    """x [b, c, ...] -> x delayed by `chunks` along axis 1, `fill` before the start."""
    pad = [(0, 0), (chunks, 0)] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, pad, constant_values=fill)[:, : x.shape[1]]


def select(positions, values, slots, lag, eviction):
    """Slides (fifo) or scans (score) over the chunks' selections."""
    b, c, k = positions.shape
    if eviction == "fifo":
        rows = [_delay(positions, lag + r, -1) for r in range(slots // k)]
        return jnp.concatenate(rows[::-1], axis=2)

    def merge(buffer, new):
        pos = jnp.concatenate([buffer[0], new[0]], axis=1)
        val, keep = jax.lax.top_k(jnp.concatenate([buffer[1], new[1]], axis=1), slots)
        buffer = (jnp.take_along_axis(pos, keep, axis=1), val)
        return buffer, jnp.where(val > -jnp.inf, buffer[0], -1)

    start = (jnp.full((b, slots), -1, jnp.int32), jnp.full((b, slots), -jnp.inf, jnp.float32))
    arriving = (jnp.swapaxes(_delay(positions, lag, -1), 0, 1),
                jnp.swapaxes(_delay(values, lag, -jnp.inf), 0, 1))
    _, rows = jax.lax.scan(merge, start, arriving)
    return jnp.swapaxes(rows, 0, 1)
