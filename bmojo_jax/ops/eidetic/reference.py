"""The `reference` implementation of `select_eidetic`: every chunk's buffer rebuilt from all past
selections (obviously correct, O(c^2)). The oracle.

Implementation signature (shared by every implementation of the op, see `api`):
    (positions int32 [b,c,k] (-1 = none), values float32 [b,c,k] (-inf = none), slots m, lag L,
     eviction "fifo" | "score", starts int32 [b,c] (first position of each query chunk's
     document)) -> memory_positions int32 [b,c,m] (-1 = empty)
`positions` and `values` are each chunk's top-k (`api.chunk_topk`); the knobs are checked by `api`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def select(positions, values, slots, lag, eviction, starts):
    """For each chunk: the selections of the chunks it may read (fifo: the newest m / k of them;
    score: all of them) from its document (positions >= its start), padded to m slots, then
    (score) the top m by score."""
    b, c, k = positions.shape
    rows = []
    for chunk in range(c):
        last = chunk - lag  # newest chunk whose selections are visible
        first = 0 if eviction == "score" else last - slots // k + 1
        pos = positions[:, max(first, 0):max(last + 1, 0)].reshape(b, -1)
        val = values[:, max(first, 0):max(last + 1, 0)].reshape(b, -1)
        val = jnp.where(pos >= starts[:, chunk, None], val, -jnp.inf)
        pad = slots - pos.shape[1]
        if pad > 0:
            pos = jnp.pad(pos, [(0, 0), (0, pad)], constant_values=-1)
            val = jnp.pad(val, [(0, 0), (0, pad)], constant_values=-jnp.inf)
        if eviction == "score":
            val, keep = jax.lax.top_k(val, slots)
            pos = jnp.take_along_axis(pos, keep, axis=1)
        rows.append(jnp.where(val > -jnp.inf, pos, -1))
    return jnp.stack(rows, axis=1)


def select_whole_state(innovation, x, window, per_chunk, slots, lag, eviction):
    """The "state" rule, chunk after chunk: a token's score is its innovation, or its squared
    distance to a token the state already holds verbatim (one of the w tokens before it, or an
    eidetic slot of its chunk) when that is smaller; each chunk's slots are `select`'s rows of the
    selections made so far. Dense distances, a Python loop over chunks: the oracle.

    (innovation float32 [b, t], x float32 [b, t, d], knobs) -> (memory_positions int32 [b, c, m],
    scores float32 [b, t]).
    """
    b, t = innovation.shape
    c = -(-t // window)
    pos = jnp.arange(t)
    dist = jnp.sum(jnp.square(x[:, :, None] - x[:, None]), -1)  # [b, i, j]
    before = (pos[:, None] - pos[None, :] >= 1) & (pos[:, None] - pos[None, :] <= window)
    base = jnp.minimum(innovation, jnp.min(jnp.where(before, dist, jnp.inf), axis=-1))
    scores, chosen, rows = [], [], []
    for chunk in range(c):
        lo, hi = chunk * window, min((chunk + 1) * window, t)
        if chosen:
            done = jnp.stack([p for p, _ in chosen], 1), jnp.stack([v for _, v in chosen], 1)
            pad = lambda a, fill: jnp.pad(a, [(0, 0), (0, 1), (0, 0)], constant_values=fill)  # noqa: E731
            row = select(pad(done[0], -1), pad(done[1], -jnp.inf), slots, lag, eviction,
                         jnp.zeros((b, len(chosen) + 1), jnp.int32))[:, -1]
        else:
            row = jnp.full((b, slots), -1, jnp.int32)
        held = jnp.where(row[:, None, :] >= 0, jnp.take_along_axis(
            dist[:, lo:hi], jnp.maximum(row, 0)[:, None, :], axis=2), jnp.inf)  # [b, w', m]
        score = jnp.minimum(base[:, lo:hi], jnp.min(held, axis=-1))
        padded = jnp.pad(score, [(0, 0), (0, window - (hi - lo))], constant_values=-jnp.inf)
        values, index = jax.lax.top_k(padded, per_chunk)
        chosen.append((jnp.where(values > -jnp.inf, lo + index, -1).astype(jnp.int32), values))
        scores.append(score)
        rows.append(row)
    return jnp.stack(rows, axis=1), jnp.concatenate(scores, axis=1)
