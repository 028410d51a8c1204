"""The `xla` implementation of `select_eidetic`, O(c) (same signature as `reference`).

    fifo   the buffer of chunk c is the selections of chunks c-L-r+1 .. c-L (r = m / k): r copies
           of the selections, each delayed by a whole number of chunks, side by side.
    score  a `lax.scan` over chunks keeps a running top-m of (position, score); each step merges
           the selections of chunk c-L (ties go to the earlier selection: `lax.top_k` is stable).
Packed documents: an entry before the query chunk's document start is dropped (fifo: emptied;
score: its score set to -inf before the merge, so that it leaves the running top-m for good).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _delay(x, chunks, fill):
    """x [b, c, ...] -> x delayed by `chunks` along axis 1, `fill` before the start."""
    pad = [(0, 0), (chunks, 0)] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, pad, constant_values=fill)[:, : x.shape[1]]


def select(positions, values, slots, lag, eviction, starts):
    """Slides (fifo) or scans (score) over the chunks' selections."""
    b, c, k = positions.shape
    if eviction == "fifo":
        rows = jnp.concatenate([_delay(positions, lag + r, -1)
                                for r in range(slots // k)][::-1], axis=2)
        return jnp.where(rows >= starts[:, :, None], rows, -1)

    def merge(buffer, new):
        *new, start = new
        pos = jnp.concatenate([buffer[0], new[0]], axis=1)
        val = jnp.concatenate([buffer[1], new[1]], axis=1)
        val, keep = jax.lax.top_k(jnp.where(pos >= start[:, None], val, -jnp.inf), slots)
        buffer = (jnp.take_along_axis(pos, keep, axis=1), val)
        return buffer, jnp.where(val > -jnp.inf, buffer[0], -1)

    start = (jnp.full((b, slots), -1, jnp.int32), jnp.full((b, slots), -jnp.inf, jnp.float32))
    arriving = (jnp.swapaxes(_delay(positions, lag, -1), 0, 1),
                jnp.swapaxes(_delay(values, lag, -jnp.inf), 0, 1), jnp.swapaxes(starts, 0, 1))
    _, rows = jax.lax.scan(merge, start, arriving)
    return jnp.swapaxes(rows, 0, 1)


def select_whole_state(innovation, x, window, per_chunk, slots, lag, eviction):
    """The "state" rule (see `reference.select_whole_state`) in O(t (w + m) d): the distances to
    the w tokens before each token in chunked blocks, then a `lax.scan` over chunks carrying the
    buffer (fifo or score, as `select`) and the lag queue of the last L chunks' selections."""
    b, t = innovation.shape
    d = x.shape[-1]
    c = -(-t // window)
    pad = c * window - t
    xc = jnp.pad(x, [(0, 0), (0, pad), (0, 0)]).reshape(b, c, window, d)
    keys = jnp.concatenate([_delay(xc, 1, 0.0), xc], axis=2)  # [b, c, 2w, d]: chunks c-1, c
    dist = jnp.sum(jnp.square(xc[:, :, :, None] - keys[:, :, None]), -1)  # [b, c, w, 2w]
    q_pos = jnp.arange(window)[:, None] + window  # within [chunk c-1, chunk c]
    gap = q_pos - jnp.arange(2 * window)[None, :]
    first = (jnp.arange(c) == 0)[:, None, None]  # chunk -1 does not exist
    visible = (gap >= 1) & (gap <= window) & ~(first & (jnp.arange(2 * window) < window))
    nearest = jnp.min(jnp.where(visible[None], dist, jnp.inf), axis=-1)  # [b, c, w]
    innovation = jnp.pad(innovation, [(0, 0), (0, pad)]).reshape(b, c, window)
    real = (jnp.arange(c * window) < t).reshape(c, window)
    base = jnp.where(real[None], jnp.minimum(innovation, nearest), -jnp.inf)

    def step(carry, inputs):
        buffer_pos, buffer_val, queue_pos, queue_val = carry
        base_c, x_c, start = inputs  # [b, w], [b, w, d], scalar
        # the selections of chunk c - L arrive (the queue's oldest entry)
        arriving_pos, arriving_val = queue_pos[:, 0], queue_val[:, 0]
        if eviction == "fifo":
            buffer_pos = jnp.concatenate([buffer_pos[:, per_chunk:], arriving_pos], axis=1)
            buffer_val = jnp.concatenate([buffer_val[:, per_chunk:], arriving_val], axis=1)
        else:
            merged_pos = jnp.concatenate([buffer_pos, arriving_pos], axis=1)
            buffer_val, keep = jax.lax.top_k(jnp.concatenate([buffer_val, arriving_val], 1),
                                             slots)
            buffer_pos = jnp.take_along_axis(merged_pos, keep, axis=1)
        row = jnp.where(buffer_val > -jnp.inf, buffer_pos, -1)
        held = jax.vmap(lambda xb, pb: xb[pb])(x, jnp.maximum(row, 0))  # [b, m, d]
        to_slots = jnp.sum(jnp.square(x_c[:, :, None] - held[:, None]), -1)  # [b, w, m]
        score = jnp.minimum(base_c, jnp.min(jnp.where(row[:, None] >= 0, to_slots, jnp.inf),
                                            axis=-1))
        score = jnp.where(base_c > -jnp.inf, score, -jnp.inf)
        values, index = jax.lax.top_k(score, per_chunk)
        chosen = jnp.where(values > -jnp.inf, start + index, -1).astype(jnp.int32)
        queue_pos = jnp.concatenate([queue_pos[:, 1:], chosen[:, None]], axis=1)
        queue_val = jnp.concatenate([queue_val[:, 1:], values[:, None]], axis=1)
        return (buffer_pos, buffer_val, queue_pos, queue_val), (row, score)

    carry = (jnp.full((b, slots), -1, jnp.int32), jnp.full((b, slots), -jnp.inf, jnp.float32),
             jnp.full((b, lag, per_chunk), -1, jnp.int32),
             jnp.full((b, lag, per_chunk), -jnp.inf, jnp.float32))
    _, (rows, scores) = jax.lax.scan(step, carry, (
        jnp.swapaxes(base, 0, 1), jnp.swapaxes(xc, 0, 1), jnp.arange(c) * window))
    return jnp.swapaxes(rows, 0, 1), jnp.swapaxes(scores, 0, 1).reshape(b, -1)[:, :t]
