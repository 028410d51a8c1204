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

Streaming (docs/design.md section 5): `EideticState` is the same bookkeeping one token at a time:
`init_state` (empty), `state_after` (after a parallel pass over a prompt, from its scores) and
`update` (one decoded token). `update` after `state_after` reproduces `select_eidetic`'s rows
(tests: decode == forward).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

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


# --------------------------------------------------------------------------------------------------
# Streaming: the same selection one token at a time
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Selection:
    """The knobs of the selection (see module docstring): window w (= chunk, tokens), per_chunk k,
    slots m, lag L (chunks), eviction "fifo" | "score", implementation of `select_eidetic`, and
    threshold: None, or a factor c > 0: a token is a candidate only when its score exceeds c times
    the mean score of all tokens before it (a causal running mean, the first token's being 0; HAM's
    rule of growing the memory on a large prediction error, our choice of normalisation)."""

    window: int
    per_chunk: int
    slots: int
    lag: int = 2
    eviction: str = "fifo"
    implementation: Optional[str] = None
    threshold: Optional[float] = None

    def gate(self, scores):
        """Candidates' scores: [b, t] -> [b, t] float32, -inf where the threshold rejects."""
        scores = scores.astype(jnp.float32)
        if self.threshold is None:
            return scores
        t = scores.shape[1]
        before = jnp.cumsum(scores, axis=1) - scores  # sum of the scores before each token
        mean = before / jnp.maximum(jnp.arange(t), 1)
        return jnp.where(scores > self.threshold * mean, scores, -jnp.inf)

    def select(self, scores):
        """The slots of every chunk: scores [b, t] -> memory_positions [b, c, m] int32."""
        return select_eidetic(self.gate(scores), window=self.window, per_chunk=self.per_chunk,
                              slots=self.slots, lag=self.lag, eviction=self.eviction,
                              implementation=self.implementation)


@struct.dataclass
class Slots:
    """Eidetic entries: positions int32 [*s] (-1 = empty), scores float32 [*s] (-inf = empty),
    keys and values float32 [*s, h, e] (RoPE at their positions)."""

    positions: jax.Array
    scores: jax.Array
    k: jax.Array
    v: jax.Array

    @classmethod
    def empty(cls, shape, heads: int, head_dim: int) -> "Slots":
        return cls(positions=jnp.full(shape, -1, jnp.int32),
                   scores=jnp.full(shape, -jnp.inf, jnp.float32),
                   k=jnp.zeros(shape + (heads, head_dim), jnp.float32),
                   v=jnp.zeros(shape + (heads, head_dim), jnp.float32))

    @classmethod
    def gather(cls, positions, scores, k, v) -> "Slots":
        """Entries at `positions` [b, *s] (-1 = empty) of scores [b, t] and k, v [b, t, h, e]."""
        take = jax.vmap(lambda x, p: x[p])
        index = jnp.maximum(positions, 0)
        return cls(positions=positions,
                   scores=jnp.where(positions >= 0, take(scores, index), -jnp.inf),
                   k=take(k, index).astype(jnp.float32), v=take(v, index).astype(jnp.float32))


@struct.dataclass
class EideticState:
    """A `B` layer's eidetic streaming state (fixed size).

    memory: `Slots` [b, m], the slots visible to the current chunk (fifo: oldest first).
    pending: `Slots` [b, L - 1, k], selections of the last L - 1 chunks, not yet visible (oldest
      first).
    chunk_scores: float32 [b, w], candidates' scores of the current chunk's tokens so far (slot
      = position % w; -inf where not yet seen or rejected by the threshold).
    score_sum: float32 [b], the sum of all scores so far (the threshold's running mean).
    previous_f: float32 [b, d_model], the last fading token (the next score's prediction input).
    """

    memory: Slots
    pending: Slots
    chunk_scores: jax.Array
    score_sum: jax.Array
    previous_f: jax.Array


def init_state(selection: Selection, batch_size: int, heads: int, head_dim: int,
               d_model: int) -> EideticState:
    """The empty state before the first token."""
    s = selection
    return EideticState(
        memory=Slots.empty((batch_size, s.slots), heads, head_dim),
        pending=Slots.empty((batch_size, s.lag - 1, s.per_chunk), heads, head_dim),
        chunk_scores=jnp.full((batch_size, s.window), -jnp.inf, jnp.float32),
        score_sum=jnp.zeros((batch_size,), jnp.float32),
        previous_f=jnp.zeros((batch_size, d_model), jnp.float32))


def state_after(selection: Selection, scores, k, v, previous_f) -> EideticState:
    """The state after a parallel pass over t tokens.

    Args:
      selection: the knobs.
      scores: [b, t] innovation scores of the tokens.
      k, v: [b, t, h, e] their keys (RoPE applied) and values.
      previous_f: [b, d_model] the last fading token.
    """
    s = selection
    b, t = scores.shape
    current = t // s.window  # the chunk of the next token
    gated = s.gate(scores)
    padded = jnp.pad(gated, [(0, 0), (0, (current + 1) * s.window - t)], constant_values=-jnp.inf)
    selected, _ = chunk_topk(padded, s.window, s.per_chunk)  # [b, c + 1, k]

    def chunks(first, last):  # the selections of chunks first..last, -1 for chunks < 0
        index = np.arange(first, last + 1)
        return jnp.where((index >= 0)[None, :, None], selected[:, np.maximum(index, 0)], -1)

    if s.eviction == "fifo":  # the newest m / k chunks' selections, oldest first (as `update`)
        memory = chunks(current - s.lag - s.slots // s.per_chunk + 1, current - s.lag)
        memory = memory.reshape(b, s.slots)
    else:
        memory = dataclasses.replace(s, threshold=None).select(padded)[:, current]  # [b, m]
    pending = chunks(current - s.lag + 1, current - 1)  # selected, not yet visible
    return EideticState(memory=Slots.gather(memory, gated, k, v),
                        pending=Slots.gather(pending, gated, k, v),
                        chunk_scores=padded[:, current * s.window:],
                        score_sum=jnp.sum(scores.astype(jnp.float32), axis=1),
                        previous_f=previous_f.astype(jnp.float32))


def update(selection: Selection, state: EideticState, score, f, position, k_ring, v_ring):
    """One decoded token: records its score (gated by the threshold); at the last token of a chunk
    selects the chunk's top-k, queues them `lag` chunks and evicts.

    Args:
      selection: the knobs.
      state: the state before the token.
      score: [b] float32, the token's score.
      f: [b, d_model], its fading token.
      position: int32 scalar, its position.
      k_ring, v_ring: [b, w, h, e], the layer's ring buffer of the last w keys/values (slot
        = position % w), already holding this token.

    Returns:
      the next `EideticState`.
    """
    s = selection
    score = score.astype(jnp.float32)
    if s.threshold is not None:
        mean = state.score_sum / jnp.maximum(position, 1).astype(jnp.float32)
        candidate = jnp.where(score > s.threshold * mean, score, -jnp.inf)
    else:
        candidate = score
    state = state.replace(chunk_scores=state.chunk_scores.at[:, position % s.window].set(candidate),
                          score_sum=state.score_sum + score, previous_f=f.astype(jnp.float32))
    return jax.lax.cond((position + 1) % s.window == 0,
                        lambda st: _end_chunk(s, st, position, k_ring, v_ring), lambda st: st,
                        state)


def _end_chunk(s: Selection, state: EideticState, position, k_ring, v_ring) -> EideticState:
    scores, index = jax.lax.top_k(state.chunk_scores, s.per_chunk)  # stable, as chunk_topk
    take = lambda ring: jnp.take_along_axis(ring, index[:, :, None, None], axis=1)  # noqa: E731
    positions = position + 1 - s.window + index.astype(jnp.int32)
    new = Slots(positions=jnp.where(scores > -jnp.inf, positions, -1), scores=scores,
                k=take(k_ring), v=take(v_ring))
    if s.lag > 1:
        arriving = jax.tree.map(lambda x: x[:, 0], state.pending)
        pending = jax.tree.map(lambda old, x: jnp.concatenate([old[:, 1:], x[:, None]], axis=1),
                               state.pending, new)
    else:
        arriving, pending = new, state.pending
    merged = jax.tree.map(lambda old, x: jnp.concatenate([old, x], axis=1), state.memory, arriving)
    if s.eviction == "fifo":  # slots are kept oldest first, in groups of k
        memory = jax.tree.map(lambda x: x[:, s.per_chunk:], merged)
    else:  # running top-m by score, ties to the older entry
        _, order = jax.lax.top_k(merged.scores, s.slots)
        memory = jax.tree.map(lambda x: jnp.take_along_axis(
            x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1), merged)
    return state.replace(memory=memory, pending=pending,
                         chunk_scores=jnp.full_like(state.chunk_scores, -jnp.inf))
