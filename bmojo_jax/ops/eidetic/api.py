"""Eidetic memory management: which past tokens each query chunk may read verbatim.

Notation (`bmojo_jax.array_typing`): b batch, t time, w window (= chunk), c chunks = ceil(t / w),
k tokens selected per chunk (k_e), m slots (M_max); r = m / k chunks of selections that fit the
buffer, lag L.

B'MOJO (docs/design.md section 2, item 5; the exact recipe is our choice) keeps a token verbatim
when its innovation score is high:
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
gradient (selection is discrete). Packed documents (`starts`, the first position of each query
chunk's document): a selection from before that position never enters (nor stays in) the chunk's
buffer, so a document's slots are those it would have alone (exactly so when documents start at
chunk boundaries: the chunks are then the same). A query never reads its own chunk's selections,
so the query token itself is never among its eidetic keys.

Implementations (docs/design.md section 4), one module each:
    reference  `reference`: rebuilds every chunk's buffer from all past selections (obviously
               correct, O(c^2)).
    xla        `xla`: slides (fifo) or scans (score) over chunks, O(c).
There is no kernel: selection is cheap integer bookkeeping, so `pallas` (the model-wide setting)
runs the `xla` one. This module checks the knobs and computes each chunk's top-k (`chunk_topk`);
the implementations turn those into the slots of every chunk. Streaming (one token at a time):
`streaming`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from bmojo_jax import array_typing as at
from bmojo_jax.ops import registry
from bmojo_jax.ops.eidetic import reference, xla

_SELECT_EIDETIC = {"reference": reference.select, "xla": xla.select, "pallas": xla.select}
_SELECT_WHOLE_STATE = {"reference": reference.select_whole_state, "xla": xla.select_whole_state,
                       "pallas": xla.select_whole_state}
IMPLEMENTATIONS = tuple(_SELECT_EIDETIC)


def chunk_topk(scores: at.Scores, window: int, k: int) -> tuple[at.ChunkSelections,
                                                                 at.ChunkScores]:
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


def select_eidetic(scores: at.Scores, *, window: int, per_chunk: int, slots: int, lag: int = 2,
                   eviction: str = "fifo", starts: Optional[at.ChunkStarts] = None,
                   implementation: Optional[str] = None) -> at.MemoryPositions:
    """Eidetic slot positions visible to each query chunk (see module docstring).

    Args:
      scores: [b, t] innovation scores (no gradient flows through the selection).
      window: chunk length w (tokens).
      per_chunk: k, positions selected per chunk (1 <= k <= w).
      slots: m, buffer size, a positive multiple of k.
      lag: chunks between selection and visibility (>= 1).
      eviction: "fifo" or "score".
      starts: int32 [b, c], the first position of each query chunk's document (packed
        documents: `document_starts`), or None (one document).
      implementation: None (the backend's default), or one of IMPLEMENTATIONS: "reference",
        "xla", "pallas" (= "xla").

    Returns:
      memory_positions [b, c, m] int32, -1 for an empty slot. Within a row positions are distinct;
      the order is not meaningful.

    Raises:
      ValueError: a bad knob value, naming it and what is allowed; an unavailable implementation.
    """
    _check_knobs(window, per_chunk, slots, lag, eviction)
    fn = registry.pick("select_eidetic", _SELECT_EIDETIC, implementation)
    positions, values = chunk_topk(jax.lax.stop_gradient(scores), window, per_chunk)
    if starts is None:
        starts = jnp.zeros(positions.shape[:2], jnp.int32)
    return fn(positions, values, slots, lag, eviction, starts)


def slots_filled(length: int, *, window: int, per_chunk: int, slots: int, lag: int = 2) -> int:
    """The most slots a sequence of `length` tokens fills (its last chunk's buffer): every chunk
    but the last `lag` contributes `per_chunk` selections, up to `slots` (both evictions). A
    model trained at a context that fills fewer than `slots` never sees a full buffer, nor eidetic
    keys older than its context; past that context it reads both, unless `slots` is at most this
    number and the eviction is "fifo" (the long-context suite measured the difference,
    docs/design.md section 7d).

    Raises:
      ValueError: a bad knob (as `select_eidetic`) or length < 1.
    """
    _check_knobs(window, per_chunk, slots, lag, "fifo")
    if length < 1:
        raise ValueError(f"length={length}: must be >= 1 (tokens).")
    return min(slots, per_chunk * max(0, -(-length // window) - lag))


def document_starts(segment_ids: at.SegmentIds, window: int) -> at.ChunkStarts:
    """The first position of the document of each chunk's first token: segment_ids int [b, t]
    (a document is a run of equal ids) -> int32 [b, c], c = ceil(t / window)."""
    b, t = segment_ids.shape
    new = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], [(0, 0), (1, 0)])
    start = jax.lax.cummax(jnp.where(new, jnp.arange(t), 0), axis=1)  # [b, t]
    return start[:, ::window].astype(jnp.int32)


def _check_knobs(window, per_chunk, slots, lag, eviction) -> None:
    if not 1 <= per_chunk <= window:
        raise ValueError(f"per_chunk={per_chunk}: must be in [1, window={window}].")
    if slots < per_chunk or slots % per_chunk:
        raise ValueError(f"slots={slots}: must be a positive multiple of per_chunk={per_chunk}.")
    if lag < 1:
        raise ValueError(f"lag={lag}: must be >= 1 (a chunk's selection depends on all its "
                         f"tokens).")
    if eviction not in ("fifo", "score"):
        raise ValueError(f"eviction={eviction!r}: allowed values are 'fifo', 'score'.")


def select_whole_state(innovation: at.Scores, x: at.Activations, *, window: int,
                       per_chunk: int, slots: int, lag: int = 2, eviction: str = "fifo",
                       implementation: Optional[str] = None
                       ) -> tuple[at.MemoryPositions, at.Scores]:
    """The "state" selection rule (`ModelConfig.eidetic_selection`; our choice): innovation
    against the whole state. A token's score is
        s_t = min(innovation_t, min_{j in H_t} ||x_t - x_j||^2),
    H_t = the tokens the state holds verbatim when t arrives: the w tokens before it and the
    eidetic slots of its chunk. A token already held (a repeated query key) is predictable and
    does not take a slot again. The slots depend on earlier selections, so the chunks are
    selected one after the other (a scan), with the same top-k, lag and eviction as
    `select_eidetic`.

    Args:
      innovation: [b, t] innovation scores against the fading state.
      x: [b, t, d] the tokens (the layer's input); no gradient flows.
      window, per_chunk, slots, lag, eviction, implementation: as `select_eidetic`.

    Returns:
      (memory_positions [b, c, m] int32, -1 = empty; scores [b, t] float32, the s_t above).

    Raises:
      ValueError: as `select_eidetic`.
    """
    _check_knobs(window, per_chunk, slots, lag, eviction)
    fn = registry.pick("select_eidetic", _SELECT_WHOLE_STATE, implementation)
    innovation, x = (jax.lax.stop_gradient(a).astype(jnp.float32) for a in (innovation, x))
    return fn(innovation, x, window, per_chunk, slots, lag, eviction)


def window_quantile(before: jax.Array, q: float) -> jax.Array:
    """The "quantile" gate's threshold: [..., w] float32 scores of the tokens before a token
    (NaN where there is none) -> [...] their q-quantile (`jnp.nanquantile`, linear
    interpolation), -inf where there is none (the token passes). One function for the parallel
    forward and decoding, so that both gate alike (the quantile does not depend on the order)."""
    some = jnp.any(~jnp.isnan(before), axis=-1)
    safe = jnp.where(some[..., None], before, 0.0)  # nanquantile of all-NaN rows warns
    return jnp.where(some, jnp.nanquantile(safe, q, axis=-1), -jnp.inf)


@dataclasses.dataclass(frozen=True)
class Selection:
    """The knobs of the selection (see module docstring): window w (= chunk, tokens), per_chunk k,
    slots m, lag L (chunks), eviction "fifo" | "score", implementation of `select_eidetic`, and
    threshold: None, or a factor c > 0: a token is a candidate only when its score exceeds c times
    the mean score of all tokens before it (a causal running mean, the first token's being 0; HAM's
    rule of growing the memory on a large prediction error, our choice of normalisation);
    quantile: None, or q in (0, 1): a token is a candidate only when its score exceeds the
    q-quantile of the scores of the w tokens before it (`window_quantile`; every token is one
    while none precede it; our choice of a running quantile with a state of w scores);
    whole_state: the "state" rule (`select_whole_state`): the scores also read the tokens the
    state holds, so the selection needs the tokens (`select_with_tokens`).

    Raises:
      ValueError: both gates set, or a quantile outside (0, 1).
    """

    window: int
    per_chunk: int
    slots: int
    lag: int = 2
    eviction: str = "fifo"
    implementation: Optional[str] = None
    threshold: Optional[float] = None
    quantile: Optional[float] = None
    whole_state: bool = False

    def __post_init__(self):
        if self.threshold is not None and self.quantile is not None:
            raise ValueError("Selection: threshold and quantile are two gates; set at most one.")
        if self.quantile is not None and not 0 < self.quantile < 1:
            raise ValueError(f"Selection.quantile={self.quantile!r}: must be in (0, 1).")

    def gate(self, scores: at.Scores) -> at.Scores:
        """Candidates' scores: [b, t] -> [b, t] float32, -inf where the gate rejects."""
        scores = scores.astype(jnp.float32)
        if self.threshold is not None:
            t = scores.shape[1]
            before = jnp.cumsum(scores, axis=1) - scores  # sum of the scores before each token
            mean = before / jnp.maximum(jnp.arange(t), 1)
            return jnp.where(scores > self.threshold * mean, scores, -jnp.inf)
        if self.quantile is not None:
            t = scores.shape[1]
            padded = jnp.pad(scores, [(0, 0), (self.window, 0)], constant_values=jnp.nan)
            # [b, t, w]: the scores of the w tokens before each token, NaN before the first
            before = padded[:, np.arange(t)[:, None] + np.arange(self.window)]
            return jnp.where(scores > window_quantile(before, self.quantile), scores, -jnp.inf)
        return scores

    def select(self, scores: at.Scores, starts: Optional[at.ChunkStarts] = None
               ) -> at.MemoryPositions:
        """The slots of every chunk: scores [b, t] -> memory_positions [b, c, m] int32; `starts`
        as in `select_eidetic`.

        Raises:
          ValueError: a bad knob value (`select_eidetic`).
        """
        return select_eidetic(self.gate(scores), window=self.window, per_chunk=self.per_chunk,
                              slots=self.slots, lag=self.lag, eviction=self.eviction,
                              starts=starts, implementation=self.implementation)

    def select_with_tokens(self, scores: at.Scores, x: at.Activations,
                           starts: Optional[at.ChunkStarts] = None
                           ) -> tuple[at.MemoryPositions, at.Scores]:
        """(slots of every chunk [b, c, m], scores [b, t]): `select_whole_state` and its final
        scores for the "state" rule, else `select` and the scores as given. x: [b, t, d] the
        layer's tokens; `starts` as in `select_eidetic` (not with the "state" rule).

        Raises:
          ValueError: `starts` with the "state" rule (its scores read the tokens before a token,
            across documents: not implemented).
        """
        if not self.whole_state:
            return self.select(scores, starts), scores
        if starts is not None:
            raise ValueError("eidetic_selection='state' takes no segment_ids (packed documents); "
                             "use another rule.")
        return select_whole_state(scores, x, window=self.window, per_chunk=self.per_chunk,
                                  slots=self.slots, lag=self.lag, eviction=self.eviction,
                                  implementation=self.implementation)
