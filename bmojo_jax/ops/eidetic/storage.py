"""The in-storage eidetic memory (docs/design.md section 7c; the paper names it, "retrieval from an
asynchronously updated memory", and gives no recipe: every choice here is ours).

Notation as in `api` (b batch, t time, w window = chunk, c chunks, h heads, e head_dim), S the
store's capacity (tokens), r the tokens retrieved per query chunk.

    store      what enters is `entry` (`config.STORAGE_ENTRIES`, `ModelConfig.storage_entry`):
               "window": every token, when it is 2 chunks old (positions < (c - 1) w are in the
               store of query chunk c: none is then in the query's window, so no key is read
               twice), for the next S tokens (fifo): chunk c's store is the positions
               [(c - 1) w - S, (c - 1) w);
               "evicted": the eidetic selections the slots' buffer evicts: a token held in the
               slots of chunk j - 1 and not in those of chunk j enters for chunk j + 1 (one
               chunk's lag, as above) and on; the store keeps the S latest positions so entered.
               Chunk c's store is the positions held in the slots of some chunk <= c - 2 and not
               in those of chunk c - 1 (a selection once evicted never returns), the S latest.
               A selection the score eviction drops on arrival was never held and never enters.
    retrieval  chunk c reads the r stored tokens whose keys have the largest dot product with the
               mean query of chunk c - 1, summed over heads (the previous chunk's: chunk c's own
               queries are not all known when its first token is decoded, so this keeps the
               retrieval causal and decodable); positions the chunk already reads as eidetic
               slots are not retrieved again; packed documents retrieve from their own only.
The retrieved positions join the eidetic slots of the chunk (`memory_positions`), so one softmax
reads window, fading, eidetic and stored keys, RoPE at their true positions.

Cost (parallel form, `retrieve`): the scores of every chunk against every key, [b, c, t] (float32,
t^2 / w per row) from one einsum, O(t^2 d / w) work, then a top-r per chunk; at t = 32k, w = 64,
b = 1 that is 16M scores (64 MB); "evicted" adds [b, c, t] masks of the same size. Decoding
(`StorageState`) keeps the store as a ring of S + w keys and values ("window"; S for "evicted":
the S latest entered, replaced by position) and scores it once per chunk, O((S + w) d) work per
chunk; the ring is allocated at its capacity (the store fills with the context up to it). The
ring is an ordinary array of the decoding cache: for long decoding it can be placed in host
memory (`jax.device_put(cache, memory_kind="pinned_host")` where the backend has one) and brought
to the device once per chunk.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import struct

from bmojo_jax import array_typing as at

LAG = 2  # chunks between a token's own chunk and the first chunk that may retrieve it


class Knobs(NamedTuple):
    """A layer's store: capacity S (tokens), topk r (tokens retrieved per chunk), entry (what
    enters, `config.STORAGE_ENTRIES`) and recall (1: exact top-k; below 1, `top_r`)."""

    capacity: int
    topk: int
    entry: str
    recall: float


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
             starts: Optional[at.ChunkStarts] = None, entry: str = "window",
             recall: float = 1.0) -> at.MemoryPositions:
    """The stored positions each query chunk reads (see module docstring): dense scores, masked
    to the chunk's store, top r. No gradient flows (retrieval is discrete).

    Args:
      q, k: [b, t, h, e] queries and keys (RoPE applied).
      window: w, the chunk (tokens).
      capacity: S, the store's size (tokens).
      topk: r, tokens retrieved per chunk (<= S).
      exclude: int [b, c, m] positions each chunk already reads (its eidetic slots; -1 = none),
        never retrieved; or None. With entry="evicted" the store is made of them (required).
      starts: int [b, c], the first position of each chunk's document (packed documents), or
        None.
      entry: what enters the store, one of `config.STORAGE_ENTRIES`.
      recall: 1.0, the exact top r; below 1, `lax.approx_max_k`'s recall target (`top_r`).

    Returns:
      int32 [b, c, r], retrieved positions, -1 where the store has fewer than r tokens.
    """
    b, t, h, e = k.shape
    c = -(-t // window)
    summary = jax.lax.stop_gradient(chunk_queries(q, window))
    scores = jnp.einsum("bche,bthe->bct", summary, jax.lax.stop_gradient(k).astype(jnp.float32))
    position = jnp.arange(t)
    if entry == "window":
        end = (jnp.arange(c) - (LAG - 1)) * window  # [c]: the store holds positions < end
        stored = (position[None] < end[:, None]) & (position[None] >= end[:, None] - capacity)
        stored = jnp.broadcast_to(stored[None], (b, c, t))
    else:
        stored = evicted_store(exclude, t, capacity)
    if starts is not None:
        stored = stored & (position[None, None] >= starts[:, :, None])
    if exclude is not None:
        stored = stored & ~jnp.any(position[None, None, None] == exclude[..., None], axis=2)
    scores = jnp.where(stored, scores, -jnp.inf)
    if t < topk:  # fewer tokens than r: the extra columns stay empty
        scores = jnp.pad(scores, [(0, 0), (0, 0), (0, topk - t)], constant_values=-jnp.inf)
    values, index = top_r(scores, topk, recall)
    return jnp.where(values > -jnp.inf, index, -1).astype(jnp.int32)


def top_r(scores: jax.Array, r: int, recall: float) -> tuple[jax.Array, jax.Array]:
    """(values, indices) of the r largest scores along the last axis: `lax.top_k` (exact) when
    recall is 1, else `lax.approx_max_k` with that recall target, which serves large stores on
    TPU (Chern et al. 2022; approximate there only: XLA's version on CPU and GPU is exact, so
    decode == forward is guaranteed off TPU only)."""
    if recall >= 1.0:
        return jax.lax.top_k(scores, r)
    return jax.lax.approx_max_k(scores, r, recall_target=recall)


def _held(slots: at.MemoryPositions, t: int) -> jax.Array:
    """bool [b, c, t]: whether each position is in each chunk's slots (int [b, c, m], -1 =
    empty)."""
    b, c, _ = slots.shape
    index = jnp.where(slots >= 0, slots, t)  # empty slots mark a spare column, dropped
    rows, chunks = jnp.arange(b)[:, None, None], jnp.arange(c)[None, :, None]
    return jnp.zeros((b, c, t + 1), bool).at[rows, chunks, index].set(True)[..., :t]


def evicted_store(slots: at.MemoryPositions, t: int, capacity: int) -> jax.Array:
    """bool [b, c, t]: each chunk's store of evicted selections (module docstring): positions
    in the slots (int [b, c, m]) of a chunk <= c - 2 and not in those of chunk c - 1, the
    `capacity` latest of them."""
    inside = _held(slots, t)
    ever = jnp.cumsum(inside.astype(jnp.int32), axis=1) > 0  # held by chunk c or before
    shift = lambda a, n: jnp.pad(a, [(0, 0), (n, 0), (0, 0)])[:, :a.shape[1]]  # noqa: E731
    stored = shift(ever, LAG) & ~shift(inside, LAG - 1)
    newer = jnp.flip(jnp.cumsum(jnp.flip(stored, -1).astype(jnp.int32), -1), -1)  # >= p
    return stored & (newer <= capacity)


@struct.dataclass
class StorageState:
    """A `B` layer's store while decoding (fixed size).

    k, v: float32 [b, n, h, e]: entry "window", n = S + w, a ring of the last S + w tokens' keys
      and values (slot = position % (S + w)): the store of the next chunk and the tokens not yet
      in it; entry "evicted", n = S, the S latest evicted selections (in no order).
    positions: int32 [b, n], each slot's position (-1 = empty).
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
               topk: int, entry: str = "window") -> StorageState:
    """The empty store before the first token: a ring of n = capacity + window slots (entry
    "window"; capacity for "evicted") of `heads` x `head_dim` float32 keys and values (4 n h e
    bytes each per sequence), positions -1, `topk` empty retrieved slots. Our choice (module
    docstring); raises nothing (the knobs are checked by `ModelConfig`)."""
    size = capacity + window if entry == "window" else capacity
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
                start: Optional[at.BatchPositions] = None, entry: str = "window",
                slots: Optional[at.MemoryPositions] = None, recall: float = 1.0
                ) -> StorageState:
    """The store after a parallel pass over t tokens, so that `update` continues it exactly.

    Args:
      q, k, v: [b, t, h, e] the pass's queries and keys (RoPE applied) and values.
      retrieved: int [b, c, r], `retrieve`'s positions of every chunk.
      window, capacity: w and S (tokens).
      exclude: int [b, m], the next chunk's eidetic slots (used when t ends a chunk: the next
        chunk then retrieves now, from the last chunk's queries, as `update` would), or None.
      start: int [b], the first position of the last document (packed documents: nothing before
        it is kept), or None.
      entry: what enters the store, one of `config.STORAGE_ENTRIES`.
      slots: int [b, c, m], every chunk's eidetic slots in the pass (entry "evicted"; with
        `exclude`, the next chunk's, required then).
      recall: as in `retrieve`.

    Returns:
      The `StorageState` before token t.
    """
    if entry == "evicted":
        return _evicted_state_after(q, k, v, retrieved, slots, exclude, window=window,
                                    capacity=capacity, start=start, recall=recall)
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
                          capacity, retrieved.shape[-1], exclude, start, recall)
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
           start: Optional[at.BatchPositions] = None,
           evicted: Optional[tuple[jax.Array, jax.Array, jax.Array]] = None,
           recall: float = 1.0) -> StorageState:
    """One decoded token (q, k, v [b, h, e] at `position`, an int32 scalar) enters the chunk's
    query sum, and the ring (entry "window", `evicted` None); after the last token of a chunk the
    next chunk's tokens are retrieved (`exclude` int [b, m]: the positions it reads as eidetic
    slots; `start` int [b]: its document's first position), then (entry "evicted") the
    selections the slots' buffer has just evicted, `evicted` = (positions int [b, m], -1 =
    none; keys, values [b, m, h, e]), enter the store; `recall` as in `retrieve`. Returns the
    next `StorageState`; under jit, one `lax.cond` per token (the retrieval runs at chunk ends
    only)."""
    state = state.replace(q_sum=state.q_sum + q.astype(jnp.float32))
    if evicted is None:
        slot = position % state.k.shape[1]
        state = state.replace(k=state.k.at[:, slot].set(k.astype(jnp.float32)),
                              v=state.v.at[:, slot].set(v.astype(jnp.float32)),
                              positions=state.positions.at[:, slot].set(position))

    def end_chunk(st):
        rows = _from_ring(st.q_sum / window, st.k, st.v, st.positions, position + 1, window,
                          capacity if evicted is None else None, st.retrieved.shape[-1],
                          exclude, start, recall)
        st = st.replace(q_sum=jnp.zeros_like(st.q_sum), retrieved=rows[0],
                        retrieved_k=rows[1], retrieved_v=rows[2])
        return st if evicted is None else _enter(st, *evicted)

    return jax.lax.cond((position + 1) % window == 0, end_chunk, lambda st: st, state)


def _enter(state: StorageState, positions, k, v) -> StorageState:
    """The "evicted" store after entries (positions int [b, m], -1 = none; k, v [b, m, h, e])
    join it: the S latest positions of both."""
    latest, index = jax.lax.top_k(jnp.concatenate([state.positions, positions], axis=1),
                                  state.positions.shape[1])
    take = lambda old, new: jnp.take_along_axis(  # noqa: E731
        jnp.concatenate([old, new.astype(jnp.float32)], axis=1), index[..., None, None], axis=1)
    return state.replace(positions=latest, k=take(state.k, k), v=take(state.v, v))


def _evicted_state_after(q, k, v, retrieved, slots, upcoming, *, window, capacity, start,
                         recall):
    """`state_after` for entry "evicted": the store of the chunk after the current one (the
    evictions up to the current chunk's start have entered), built from every chunk's `slots`
    [b, c, m] and the current chunk's `upcoming` [b, m]; the current chunk's retrieval as
    `update` makes it."""
    b, t, h, e = k.shape
    current, done = t // window, (t // window) * window  # the next token's chunk, its start
    # chunks 0 .. current - 1, the current one, and one more (only chunks before a row count)
    known = jnp.concatenate([slots[:, :current], upcoming[:, None], upcoming[:, None]], axis=1)
    store = evicted_store(known, t, capacity)  # [b, current + 2, t]

    def as_ring(mask):  # the store's positions [b, S] (latest first), keys, values
        latest, index = jax.lax.top_k(jnp.where(mask, jnp.arange(t), -1), min(capacity, t))
        latest = jnp.pad(latest, [(0, 0), (0, capacity - latest.shape[1])], constant_values=-1)
        return _gather(latest, k, v)

    positions, ring_k, ring_v = as_ring(store[:, current + 1])
    q_sum = q[:, done:].astype(jnp.float32).sum(axis=1)
    if done == t:  # the next token starts a chunk: retrieve for it now, as `update` would
        chunk_q = q[:, t - window:].astype(jnp.float32).mean(axis=1)
        ring = as_ring(store[:, current])  # before this chunk's evictions enter
        rows = _from_ring(chunk_q, ring[1], ring[2], ring[0], t, window, None,
                          retrieved.shape[-1], upcoming, start, recall)
    else:  # the current chunk's, less what an earlier document retrieved
        rows = retrieved[:, current]
        rows = _gather(rows if start is None else jnp.where(rows >= start[:, None], rows, -1),
                       k, v)
    return StorageState(k=ring_k, v=ring_v, positions=positions, q_sum=q_sum, retrieved=rows[0],
                        retrieved_k=rows[1], retrieved_v=rows[2])


def _from_ring(chunk_q, k, v, positions, chunk_start, window, capacity, topk, exclude, start,
               recall):
    """Retrieval for the chunk that starts at `chunk_start` from ring entries (keys k, values v
    [b, s, h, e], positions [b, s], -1 = empty) with the chunk query chunk_q [b, h, e]:
    (positions [b, r], keys, values [b, r, h, e]). Candidates in position order, as in
    `retrieve`, so that ties break alike. `capacity` None: every entry is in the store (entry
    "evicted"); else the entries 2 chunks old or more, the last `capacity` tokens of them."""
    order = jnp.argsort(positions, axis=1)
    positions = jnp.take_along_axis(positions, order, axis=1)
    k = jnp.take_along_axis(k, order[..., None, None], axis=1)
    v = jnp.take_along_axis(v, order[..., None, None], axis=1)
    end = chunk_start - (LAG - 1) * window  # the store holds positions < end
    stored = (positions >= 0) if capacity is None else (
        (positions >= 0) & (positions < end) & (positions >= end - capacity))
    if start is not None:
        stored = stored & (positions >= start[:, None])
    if exclude is not None:
        stored = stored & ~jnp.any(positions[:, :, None] == exclude[:, None, :], axis=2)
    scores = jnp.einsum("bhe,bshe->bs", chunk_q, k)
    values, index = top_r(jnp.where(stored, scores, -jnp.inf), topk, recall)
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
