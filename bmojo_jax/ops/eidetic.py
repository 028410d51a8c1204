"""Eidetic memory management: which past tokens each query chunk may read verbatim.

Notation: b batch, t time, w window (= chunk), c chunks = ceil(t / w), k tokens selected per chunk
(k_e), m slots (M_max), r = m / k chunks of selections that fit the buffer, lag L.

B'MOJO (DESIGN.md section 2, item 5; the exact recipe is our choice) keeps a token verbatim when its
innovation score is high:
  1. per chunk, select the k positions with the largest score (`chunk_topk`); ties go to the earlier
     position (`lax.top_k` is stable); padding positions (t not a multiple of w) are never selected;
  2. tokens selected in chunk j become visible to queries of chunks c >= j + L (L >= 1 keeps the
     selection causal: a chunk's top-k depends on all of its tokens; L = 2 keeps eidetic tokens out
     of the query's window);
  3. the buffer holds m slots, evicting by
       fifo   the newest r chunks' selections: chunks c-L-r+1 .. c-L;
       score  a running top-m by score over every selection of chunks <= c-L (keeps surprising
              tokens from the start of a long context; ties go to the earlier selection).
The result is `memory_positions` [b, c, m] int32 with -1 for an empty slot: static shapes, no
gradient (selection is discrete). A query never reads its own chunk's selections, so the query token
itself is never among its eidetic keys.

Implementations: `reference` rebuilds every chunk's buffer from all past selections (obviously
correct, O(c^2)); `xla` slides (fifo) or scans (score) over chunks, O(c).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from bmojo_jax.ops import registry


def chunk_topk(scores, window: int, k: int):
    """Top-k positions of each chunk of `window` tokens.

    Args:
      scores: [b, t] float innovation scores.
      window: chunk length w (tokens).
      k: positions selected per chunk.

    Returns:
      positions [b, c, k] int32 (-1 where the chunk has fewer than k real tokens) and their scores
      [b, c, k] float32 (-inf there).
    """
    b, t = scores.shape
    c = -(-t // window)
    padded = jnp.pad(scores.astype(jnp.float32), [(0, 0), (0, c * window - t)],
                     constant_values=-jnp.inf)
    values, index = jax.lax.top_k(padded.reshape(b, c, window), k)
    positions = index + (jnp.arange(c) * window)[None, :, None]
    return jnp.where(values > -jnp.inf, positions, -1).astype(jnp.int32), values


def _reference(positions, values, slots, lag, eviction):
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


def _delay(x, chunks, fill):
    """x [b, c, ...] -> x delayed by `chunks` along axis 1, `fill` before the start."""
    pad = [(0, 0), (chunks, 0)] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, pad, constant_values=fill)[:, : x.shape[1]]


def _sliding(positions, values, slots, lag, eviction):
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


# Selection is cheap integer bookkeeping with no kernel: the `pallas` model path uses the xla one.
_IMPLEMENTATIONS = {"reference": _reference, "xla": _sliding, "pallas": _sliding}


def select_eidetic(scores, *, window: int, per_chunk: int, slots: int, lag: int = 2,
                   eviction: str = "fifo", implementation: Optional[str] = None):
    """Eidetic slot positions visible to each query chunk (see module docstring).

    Args:
      scores: [b, t] innovation scores (no gradient flows through the selection).
      window: chunk length w (tokens).
      per_chunk: k, positions selected per chunk (1 <= k <= w).
      slots: m, buffer size, a positive multiple of k.
      lag: chunks between selection and visibility (>= 1).
      eviction: "fifo" or "score".
      implementation: None, "reference" or "xla".

    Returns:
      memory_positions [b, c, m] int32, -1 for an empty slot. Within a row positions are distinct;
      the order is not meaningful.

    Raises:
      ValueError: a bad knob value, naming it and what is allowed.
    """
    if not 1 <= per_chunk <= window:
        raise ValueError(f"per_chunk={per_chunk}: must be in [1, window={window}].")
    if slots < per_chunk or slots % per_chunk:
        raise ValueError(f"slots={slots}: must be a positive multiple of per_chunk={per_chunk}.")
    if lag < 1:
        raise ValueError(f"lag={lag}: must be >= 1 (a chunk's selection depends on all its tokens).")
    if eviction not in ("fifo", "score"):
        raise ValueError(f"eviction={eviction!r}: allowed values are 'fifo', 'score'.")
    fn = registry.pick("select_eidetic", _IMPLEMENTATIONS, implementation)
    positions, values = chunk_topk(jax.lax.stop_gradient(scores), window, per_chunk)
    return fn(positions, values, slots, lag, eviction)
