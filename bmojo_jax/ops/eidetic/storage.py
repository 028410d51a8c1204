"""The in-storage eidetic memory (docs/design.md section 7c; the paper names it, "retrieval from an
asynchronously updated memory", and gives no recipe: every choice here is ours).

Notation as in `api` (b batch, t time, w window = chunk, c chunks, h heads, e head_dim), S the
store's capacity (tokens), r the tokens retrieved per query chunk.

    store      every token enters when it is 2 chunks old (positions < (c - 1) w are in the store
               of query chunk c: none is then in the query's window, so no key is read twice) and
               stays for the next S tokens (fifo): chunk c's store is the positions
               [(c - 1) w - S, (c - 1) w).
    retrieval  chunk c reads the r stored tokens whose keys have the largest dot product with the
               mean query of chunk c - 1, summed over heads (the previous chunk's: chunk c's own
               queries are not all known when its first token is decoded, so this keeps the
               retrieval causal and decodable); positions the chunk already reads as eidetic
               slots are not retrieved again; packed documents retrieve from their own only.
The retrieved positions join the eidetic slots of the chunk (`memory_positions`), so one softmax
reads window, fading, eidetic and stored keys, RoPE at their true positions.

Cost (parallel form, `retrieve`): the scores of every chunk against every key, [b, c, t] (float32,
t^2 / w per row) from one einsum, O(t^2 d / w) work, then a top-r per chunk; at t = 32k, w = 64,
b = 1 that is 16M scores (64 MB). Decoding (`StorageState`) keeps the store as a ring of
S + w keys and values (it grows with the context up to its capacity: preallocated) and scores it
once per chunk, O((S + w) d) work per chunk. The ring is an ordinary array of the decoding cache:
for long decoding it can be placed in host memory (`jax.device_put(cache, memory_kind=
"pinned_host")` where the backend has one) and brought to the device once per chunk.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

from bmojo_jax import array_typing as at

LAG = 2  # chunks between a token's own chunk and the first chunk that may retrieve it


def chunk_queries(q: at.QKV, window: int) -> jax.Array:
    """The query that retrieves for each chunk: the mean query of the chunk before (zeros for
    chunk 0, which retrieves nothing). q [b, t, h, e] -> float32 [b, c, h, e]."""
    b, t, h, e = q.shape
    c = -(-t // window)
    padded = jnp.pad(q.astype(jnp.float32), [(0, 0), (0, c * window - t), (0, 0), (0, 0)])
    means = padded.reshape(b, c, window, h, e).mean(axis=2)
    return jnp.pad(means, [(0, 0), (1, 0), (0, 0), (0, 0)])[:, :c]


def retrieve(q: at.QKV, k: at.QKV, *, window: int, capacity: int, topk: int,
             exclude: Optional[at.MemoryPositions] = None,
             starts: Optional[at.ChunkStarts] = None) -> at.MemoryPositions:
    """The stored positions each query chunk reads (see module docstring): dense scores, masked
    to the chunk's store, top r. No gradient flows (retrieval is discrete).

    Args:
      q, k: [b, t, h, e] queries and keys (RoPE applied).
      window: w, the chunk (tokens).
      capacity: S, the store's size (tokens).
      topk: r, tokens retrieved per chunk (<= S).
      exclude: int [b, c, m] positions each chunk already reads (its eidetic slots; -1 = none),
        never retrieved; or None.
      starts: int [b, c], the first position of each chunk's document (packed documents), or
        None.

    Returns:
      int32 [b, c, r], retrieved positions, -1 where the store has fewer than r tokens.
    """
    b, t, h, e = k.shape
    c = -(-t // window)
    summary = jax.lax.stop_gradient(chunk_queries(q, window))
    scores = jnp.einsum("bche,bthe->bct", summary, jax.lax.stop_gradient(k).astype(jnp.float32))
    position = jnp.arange(t)
    end = (jnp.arange(c) - (LAG - 1)) * window  # [c]: the store holds positions < end
    stored = (position[None] < end[:, None]) & (position[None] >= end[:, None] - capacity)
    stored = jnp.broadcast_to(stored[None], (b, c, t))
    if starts is not None:
        stored = stored & (position[None, None] >= starts[:, :, None])
    if exclude is not None:
        stored = stored & ~jnp.any(position[None, None, None] == exclude[..., None], axis=2)
    scores = jnp.where(stored, scores, -jnp.inf)
    if t < topk:  # fewer tokens than r: the extra columns stay empty
        scores = jnp.pad(scores, [(0, 0), (0, 0), (0, topk - t)], constant_values=-jnp.inf)
    values, index = jax.lax.top_k(scores, topk)
    return jnp.where(values > -jnp.inf, index, -1).astype(jnp.int32)


@struct.dataclass
class StorageState:
    """A `B` layer's store while decoding (fixed size).

    k, v: float32 [b, S + w, h, e], a ring of the last S + w tokens' keys and values (slot =
      position % (S + w)): the store of the next chunk and the tokens not yet in it.
    positions: int32 [b, S + w], each slot's position (-1 = empty).
    q_sum: float32 [b, h, e], the sum of the current chunk's queries so far.
    retrieved: int32 [b, r] positions, and their keys and values float32 [b, r, h, e]: what the
      current chunk reads (-1 = empty).
    """

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    q_sum: jax.Array
    retrieved: jax.Array
    retrieved_k: jax.Array
    retrieved_v: jax.Array


def init_state(batch_size: int, heads: int, head_dim: int, *, window: int, capacity: int,
               topk: int) -> StorageState:
    """The empty store before the first token: a ring of capacity + window slots of `heads` x
    `head_dim` float32 keys and values (4 (S + w) h e bytes each per sequence), positions -1,
    `topk` empty retrieved slots. Our choice (module docstring); raises nothing (the knobs are
    checked by `ModelConfig`)."""
    size = capacity + window
    zeros = lambda *shape: jnp.zeros(shape, jnp.float32)  # noqa: E731
    return StorageState(k=zeros(batch_size, size, heads, head_dim),
                        v=zeros(batch_size, size, heads, head_dim),
                        positions=jnp.full((batch_size, size), -1, jnp.int32),
                        q_sum=zeros(batch_size, heads, head_dim),
                        retrieved=jnp.full((batch_size, topk), -1, jnp.int32),
                        retrieved_k=zeros(batch_size, topk, heads, head_dim),
                        retrieved_v=zeros(batch_size, topk, heads, head_dim))


def state_after(q: at.QKV, k: at.QKV, v: at.QKV, retrieved: at.MemoryPositions, *, window: int,
                capacity: int, exclude: Optional[jax.Array] = None,
                start: Optional[at.BatchPositions] = None) -> StorageState:
    """The store after a parallel pass over t tokens, so that `update` continues it exactly.

    Args:
      q, k, v: [b, t, h, e] the pass's queries and keys (RoPE applied) and values.
      retrieved: int [b, c, r], `retrieve`'s positions of every chunk.
      window, capacity: w and S (tokens).
      exclude: int [b, m], the next chunk's eidetic slots (used when t ends a chunk: the next
        chunk then retrieves now, from the last chunk's queries, as `update` would), or None.
      start: int [b], the first position of the last document (packed documents: nothing before
        it is kept), or None.

    Returns:
      The `StorageState` before token t (float32 ring of the last S + w tokens).
    """
    b, t, h, e = k.shape
    size = capacity + window
    ring = jnp.arange(t - size, t)  # positions of the ring's slots, some maybe < 0
    keep = (ring >= 0)[None] if start is None else (ring >= jnp.maximum(start, 0)[:, None])
    take = lambda x: jnp.where(  # noqa: E731
        keep[..., None, None], x[:, jnp.maximum(ring, 0)].astype(jnp.float32), 0.0)
    slot = ring % size
    current = t // window  # the chunk of the next token
    done = current * window  # its first position
    q_sum = q[:, done:].astype(jnp.float32).sum(axis=1)
    if done == t:  # the next token starts a chunk: retrieve for it now, as `update` would
        chunk_q = q[:, t - window:].astype(jnp.float32).mean(axis=1)
        rows = _from_ring(chunk_q, take(k), take(v), jnp.where(keep, ring, -1), t, window,
                          capacity, retrieved.shape[-1], exclude, start)
    else:  # the current chunk's, less what an earlier document retrieved
        rows = retrieved[:, current]
        rows = _gather(rows if start is None else jnp.where(rows >= start[:, None], rows, -1),
                       k, v)
    positions = jnp.full((b, size), -1, jnp.int32).at[:, slot].set(jnp.where(keep, ring, -1))
    return StorageState(k=jnp.zeros((b, size, h, e), jnp.float32).at[:, slot].set(take(k)),
                        v=jnp.zeros((b, size, h, e), jnp.float32).at[:, slot].set(take(v)),
                        positions=positions, q_sum=q_sum, retrieved=rows[0],
                        retrieved_k=rows[1], retrieved_v=rows[2])


def update(state: StorageState, q: at.QueryStep, k: at.QueryStep, v: at.QueryStep,
           position: at.IntScalar, *, window: int, capacity: int,
           exclude: Optional[jax.Array] = None,
           start: Optional[at.BatchPositions] = None) -> StorageState:
    """One decoded token (q, k, v [b, h, e] at `position`, an int32 scalar) enters the ring and
    the chunk's query sum; after the last token of a chunk the next chunk's tokens are retrieved
    (`exclude` int [b, m]: the positions it reads as eidetic slots; `start` int [b]: its
    document's first position). Returns the next `StorageState`; under jit, one `lax.cond` per
    token (the retrieval runs at chunk ends only)."""
    size = state.k.shape[1]
    slot = position % size
    state = state.replace(k=state.k.at[:, slot].set(k.astype(jnp.float32)),
                          v=state.v.at[:, slot].set(v.astype(jnp.float32)),
                          positions=state.positions.at[:, slot].set(position),
                          q_sum=state.q_sum + q.astype(jnp.float32))

    def end_chunk(st):
        rows = _from_ring(st.q_sum / window, st.k, st.v, st.positions, position + 1, window,
                          capacity, st.retrieved.shape[-1], exclude, start)
        return st.replace(q_sum=jnp.zeros_like(st.q_sum), retrieved=rows[0],
                          retrieved_k=rows[1], retrieved_v=rows[2])

    return jax.lax.cond((position + 1) % window == 0, end_chunk, lambda st: st, state)


def _from_ring(chunk_q, k, v, positions, chunk_start, window, capacity, topk, exclude, start):
    """Retrieval for the chunk that starts at `chunk_start` from ring entries (keys k, values v
    [b, s, h, e], positions [b, s], -1 = empty) with the chunk query chunk_q [b, h, e]:
    (positions [b, r], keys, values [b, r, h, e]). Candidates in position order, as in
    `retrieve`, so that ties break alike."""
    order = jnp.argsort(positions, axis=1)
    positions = jnp.take_along_axis(positions, order, axis=1)
    k = jnp.take_along_axis(k, order[..., None, None], axis=1)
    v = jnp.take_along_axis(v, order[..., None, None], axis=1)
    end = chunk_start - (LAG - 1) * window  # the store holds positions < end
    stored = (positions >= 0) & (positions < end) & (positions >= end - capacity)
    if start is not None:
        stored = stored & (positions >= start[:, None])
    if exclude is not None:
        stored = stored & ~jnp.any(positions[:, :, None] == exclude[:, None, :], axis=2)
    scores = jnp.einsum("bhe,bshe->bs", chunk_q, k)
    values, index = jax.lax.top_k(jnp.where(stored, scores, -jnp.inf), topk)
    rows = jnp.where(values > -jnp.inf, jnp.take_along_axis(positions, index, axis=1), -1)
    empty = (rows < 0)[..., None, None]
    pick = lambda x: jnp.where(  # noqa: E731
        empty, 0.0, jnp.take_along_axis(x, index[..., None, None], axis=1))
    return rows.astype(jnp.int32), pick(k), pick(v)


def _gather(rows, k, v):
    """(rows [b, r], keys, values [b, r, h, e]) of positions `rows` (-1 = empty) of k, v
    [b, t, h, e]."""
    take = jax.vmap(lambda a, p: a[p])
    index = jnp.maximum(rows, 0)
    empty = (rows < 0)[..., None, None]
    return (rows, jnp.where(empty, 0.0, take(k, index).astype(jnp.float32)),
            jnp.where(empty, 0.0, take(v, index).astype(jnp.float32)))
