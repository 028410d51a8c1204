"""The eidetic selection one token at a time, for decoding (docs/design.md section 5).

Notation as in `api` (b batch, t time, w window, k per chunk, m slots, lag L) and h heads,
e head_dim, d d_model. `EideticState` is `select_eidetic`'s bookkeeping for one `B` layer, of fixed
size: `init_state` (empty), `state_after` (after a parallel pass over a prompt, from its scores)
and `update` (one decoded token). `update` after `state_after` reproduces `select_eidetic`'s rows,
and the slots carry their keys and values, so decoding never re-reads the prompt (tests: decode ==
forward, tests/test_decoding.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from bmojo_jax import array_typing as at
from bmojo_jax.ops.eidetic.api import Selection, chunk_topk, window_quantile


@struct.dataclass
class Slots:
    """Eidetic entries: positions int32 [*s] (-1 = empty), scores float32 [*s] (-inf = empty),
    keys and values float32 [*s, h, e] (RoPE at their positions), and the tokens float32
    [*s, d] for the "state" rule ([*s, 0] otherwise)."""

    positions: jax.Array
    scores: jax.Array
    k: jax.Array
    v: jax.Array
    x: jax.Array

    @classmethod
    def empty(cls, shape, heads: int, head_dim: int, x_dim: int) -> "Slots":
        """Empty entries of shape `shape` (a tuple, e.g. (b, m))."""
        return cls(positions=jnp.full(shape, -1, jnp.int32),
                   scores=jnp.full(shape, -jnp.inf, jnp.float32),
                   k=jnp.zeros(shape + (heads, head_dim), jnp.float32),
                   v=jnp.zeros(shape + (heads, head_dim), jnp.float32),
                   x=jnp.zeros(shape + (x_dim,), jnp.float32))

    @classmethod
    def gather(cls, positions, scores: at.Scores, k: at.QKV, v: at.QKV, x) -> "Slots":
        """Entries at `positions` int [b, *s] (-1 = empty) of scores [b, t], k, v [b, t, h, e]
        and the tokens x [b, t, d or 0]."""
        take = jax.vmap(lambda a, p: a[p])
        index = jnp.maximum(positions, 0)
        return cls(positions=positions,
                   scores=jnp.where(positions >= 0, take(scores, index), -jnp.inf),
                   k=take(k, index).astype(jnp.float32), v=take(v, index).astype(jnp.float32),
                   x=take(x, index).astype(jnp.float32))


@struct.dataclass
class EideticState:
    """A `B` layer's eidetic streaming state (fixed size).

    memory: `Slots` [b, m], the slots visible to the current chunk (fifo: oldest first).
    pending: `Slots` [b, L - 1, k], selections of the last L - 1 chunks, not yet visible (oldest
      first).
    chunk_scores: float32 [b, w], candidates' scores of the current chunk's tokens so far (slot
      = position % w; -inf where not yet seen or rejected by the gate).
    score_sum: float32 [b], the sum of all scores so far (the threshold's running mean).
    score_ring: float32 [b, w], the scores of the last w tokens (slot = position % w; NaN before
      the first) for the quantile gate ([b, 0] otherwise).
    previous_f: float32 [b, d_model], the last fading token (the next score's prediction input).
    x_ring: float32 [b, w, d] the last w tokens (slot = position % w) for the "state" rule
      ([b, w, 0] otherwise).
    """

    memory: Slots
    pending: Slots
    chunk_scores: jax.Array
    score_sum: jax.Array
    score_ring: jax.Array
    previous_f: jax.Array
    x_ring: jax.Array


def _x_dim(selection: Selection, d_model: int) -> int:
    return d_model if selection.whole_state else 0


def _ring_width(selection: Selection) -> int:
    """The width of `score_ring`: w for the quantile gate, else 0."""
    return selection.window if selection.quantile is not None else 0


def init_state(selection: Selection, batch_size: int, heads: int, head_dim: int,
               d_model: int) -> EideticState:
    """The empty state before the first token (float32 keys and values of `heads` x `head_dim`,
    a fading token of d_model features)."""
    s = selection
    x_dim = _x_dim(s, d_model)
    return EideticState(
        memory=Slots.empty((batch_size, s.slots), heads, head_dim, x_dim),
        pending=Slots.empty((batch_size, s.lag - 1, s.per_chunk), heads, head_dim, x_dim),
        chunk_scores=jnp.full((batch_size, s.window), -jnp.inf, jnp.float32),
        score_sum=jnp.zeros((batch_size,), jnp.float32),
        score_ring=jnp.full((batch_size, _ring_width(s)), jnp.nan, jnp.float32),
        previous_f=jnp.zeros((batch_size, d_model), jnp.float32),
        x_ring=jnp.zeros((batch_size, s.window, x_dim), jnp.float32))


def state_after(selection: Selection, scores: at.Scores, k: at.QKV, v: at.QKV,
                previous_f: at.StepFeatures, x: at.Activations,
                start: at.BatchPositions | None = None) -> EideticState:
    """The state after a parallel pass over t tokens.

    Args:
      selection: the knobs.
      scores: [b, t] the rule's scores of the tokens (for the "state" rule the final ones, from
        `select_whole_state`).
      k, v: [b, t, h, e] their keys (RoPE applied) and values.
      previous_f: [b, d_model] the last fading token.
      x: [b, t, d_model] the tokens (kept for the "state" rule only).
      start: int32 [b], the first position of the last document (packed documents: decoding
        continues it, so nothing before it is kept), or None (0).

    Returns:
      the `EideticState` before token t.
    """
    s = selection
    b, t = scores.shape
    current = t // s.window  # the chunk of the next token
    gated = s.gate(scores)
    if start is not None:  # the last document's state: as if it had run alone
        gated = jnp.where(jnp.arange(t)[None] >= start[:, None], gated, -jnp.inf)
    padded = jnp.pad(gated, [(0, 0), (0, (current + 1) * s.window - t)], constant_values=-jnp.inf)
    selected, _ = chunk_topk(padded, s.window, s.per_chunk)  # [b, c + 1, k]

    def chunks(first, last):  # the selections of chunks first..last, -1 for chunks < 0
        index = np.arange(first, last + 1)
        return jnp.where((index >= 0)[None, :, None], selected[:, np.maximum(index, 0)], -1)

    if s.eviction == "fifo":  # the newest m / k chunks' selections, oldest first (as `update`)
        memory = chunks(current - s.lag - s.slots // s.per_chunk + 1, current - s.lag)
        memory = memory.reshape(b, s.slots)
    else:
        memory = dataclasses.replace(s, threshold=None, quantile=None).select(padded)[
            :, current]  # [b, m]
    pending = chunks(current - s.lag + 1, current - 1)  # selected, not yet visible
    x = x[..., :_x_dim(s, x.shape[-1])].astype(jnp.float32)
    ring = np.arange(t - s.window, t)  # the last w positions, slot = position % w
    x_ring = jnp.zeros((b, s.window, x.shape[-1]), jnp.float32).at[:, ring % s.window].set(
        jnp.where((ring >= 0)[None, :, None], x[:, np.maximum(ring, 0)], 0.0))
    score_ring = jnp.where((ring >= 0)[None], scores[:, np.maximum(ring, 0)].astype(jnp.float32),
                           jnp.nan)[:, np.argsort(ring % s.window)][:, :_ring_width(s)]
    return EideticState(memory=Slots.gather(memory, gated, k, v, x),
                        pending=Slots.gather(pending, gated, k, v, x),
                        chunk_scores=padded[:, current * s.window:],
                        score_sum=jnp.sum(scores.astype(jnp.float32), axis=1),
                        score_ring=score_ring,
                        previous_f=previous_f.astype(jnp.float32), x_ring=x_ring)


def update(selection: Selection, state: EideticState, score: at.StepScores, f: at.StepFeatures,
           position: at.IntScalar, k_ring: at.RingBuffer, v_ring: at.RingBuffer, x
           ) -> EideticState:
    """One decoded token: records its score (gated by the threshold or quantile gate; for the
    "state" rule the minimum with its distance to the tokens the state holds, as
    `select_whole_state`); at the last token of a chunk selects the chunk's top-k, queues them
    `lag` chunks and evicts.

    Args:
      selection: the knobs.
      state: the state before the token.
      score: [b] float32, the token's score (innovation, learned or random).
      f: [b, d_model], its fading token.
      position: int32 scalar, its position.
      k_ring, v_ring: [b, w, h, e], the layer's ring buffer of the last w keys/values (slot
        = position % w), already holding this token.
      x: [b, d_model], the token (read by the "state" rule only).

    Returns:
      the next `EideticState`.
    """
    s = selection
    score = score.astype(jnp.float32)
    if s.whole_state:
        x = x.astype(jnp.float32)
        distance = (position - jnp.arange(s.window)) % s.window  # of each ring slot's token
        distance = jnp.where(distance == 0, s.window, distance)
        window = jnp.where((distance <= position)[None], jnp.sum(
            jnp.square(state.x_ring - x[:, None]), -1), jnp.inf)
        held = jnp.where(state.memory.positions >= 0, jnp.sum(
            jnp.square(state.memory.x - x[:, None]), -1), jnp.inf)
        score = jnp.minimum(score, jnp.minimum(window.min(-1), held.min(-1)))
        state = state.replace(x_ring=state.x_ring.at[:, position % s.window].set(x))
    if s.threshold is not None:
        mean = state.score_sum / jnp.maximum(position, 1).astype(jnp.float32)
        candidate = jnp.where(score > s.threshold * mean, score, -jnp.inf)
    elif s.quantile is not None:
        candidate = jnp.where(score > window_quantile(state.score_ring, s.quantile), score,
                              -jnp.inf)
        state = state.replace(score_ring=state.score_ring.at[:, position % s.window].set(score))
    else:
        candidate = score
    state = state.replace(chunk_scores=state.chunk_scores.at[:, position % s.window].set(candidate),
                          score_sum=state.score_sum + score, previous_f=f.astype(jnp.float32))
    return jax.lax.cond((position + 1) % s.window == 0,
                        lambda st: _end_chunk(s, st, position, k_ring, v_ring), lambda st: st,
                        state)


def _end_chunk(s: Selection, state: EideticState, position, k_ring, v_ring) -> EideticState:
    """The last token of a chunk: its top-k join the pending queue; the oldest pending chunk's
    selections arrive in memory (lag 1: the new ones directly), evicting by s.eviction."""
    scores, index = jax.lax.top_k(state.chunk_scores, s.per_chunk)  # stable, as chunk_topk
    take = lambda ring: jnp.take_along_axis(  # noqa: E731
        ring, index.reshape(index.shape + (1,) * (ring.ndim - 2)), axis=1)
    positions = position + 1 - s.window + index.astype(jnp.int32)
    new = Slots(positions=jnp.where(scores > -jnp.inf, positions, -1), scores=scores,
                k=take(k_ring), v=take(v_ring), x=take(state.x_ring))
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
