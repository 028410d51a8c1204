"""One attention mixer for the whole family: `A`, `W`, `F` (B'MOJO-F) and `B` (B'MOJO).

Input X [b, t, d_model] (already RMS-normed by the block). With w = window (= chunk size):

    A  full causal attention over X.
    W  attention over the in-context window: keys j in [i-w+1, i].
    F  + fading tokens F = SSM(X): keys K_f, V_f from F at j in [i-2w+1, i-w], one softmax.
    B  + eidetic tokens: keys/values of X at positions chosen by the innovation test.

Q, K, V come from X, K_f, V_f from F (through the same projections when `tie_fading_kv`, docs/design.md
section 2); RoPE sits at every token's true position, for eidetic tokens their original one.

Eidetic memory (`B`; our choices, config knobs in brackets). The innovation of token t is
    s_t = || X_t - P(F_{t-1}) ||^2,     F_{-1} = 0,
with P [innovation_predictor: identity | linear] trained by the auxiliary loss
mean_t ||sg(X_t) - P(F_{t-1})||^2 [innovation_loss_weight], sown as the `nnx.Intermediate`
`innovation_loss` (`LanguageModel.forward` collects it for the training loss). Selection is discrete: top [eidetic_per_chunk] per
chunk, visible [eidetic_lag] chunks later, [eidetic_slots] slots, [eidetic_eviction] fifo | score;
see `ops.eidetic` for tie-breaking and padding. Padding (t not a multiple of w) is never selected and
never seen by a real query. The "fading state plus a read of the eidetic memory" predictor variant
(docs/design.md section 2) is not implemented: P reads the fading tokens only.

Dropout (`attention_dropout`, training only: a `dropout_key` handed to `prefill`) acts on the
attention read-out, the heads' weighted values before the output projection W_o, not on the
attention probabilities (our choice: the softmax is one fused op, `ops.memory_attention`, whose
Pallas kernels never materialise the probabilities; dropping read-out channels regularises the
same path without a mask inside every implementation).

Packed documents (`prefill(x, segment_ids=...)`, int [b, t], a document a run of equal ids): every
memory restarts at a document (our choices): a key of any group (window, fading, eidetic) is
visible only to queries of its document (`ops.memory_attention`), the fading SSM restarts
(`layers.ssm`), the innovation's prediction F_{-1} is 0 at a document's first token, and a
document's eidetic buffer takes no selection from before its start (`ops.select_eidetic`; the
same slots as alone when documents start at chunk boundaries), and a chunk never selects the
tokens of a document that ends inside it (no later chunk of that document could read them). The
returned state is the last document's (`AttentionState.start`), so decoding continues it as if it
had run alone. The pallas kernels take no segment_ids (the `xla` attention runs); the "state",
"threshold" and "quantile" rules read across documents and refuse them.

Sequence parallelism (`prefill(x, context=...)` with a `SequenceContext`, x one shard of a longer
sequence): RoPE at the global positions; the window and fading keys of the shard's first chunks
come from the previous shard (`context.left`, a key prefix of 2w tokens for `ops.memory_attention`);
a full-attention layer reads every shard's keys (`context.all_keys`); the eidetic selection runs on
the all-gathered scores and fetches the keys of slots held by earlier shards
(`context.eidetic_keys`). The same op computes the attention in both cases.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from bmojo_jax import array_typing as at
from bmojo_jax import ops
from bmojo_jax.config import CROSS_DOCUMENT_SELECTIONS, ModelConfig
from bmojo_jax.layers.ssm import SSM, SSMState
from bmojo_jax.ops import eidetic
from bmojo_jax.ops.eidetic import storage


# the rules whose scores read the predictor
INNOVATION_RULES = ("fading", "state", "threshold", "quantile")


class EideticTrace(nnx.Variable):
    """What a `B` layer records of its eidetic memory in a plain parallel forward, for
    `LanguageModel.eidetic_trace` (sown as this variable type, captured only there): with
    eidetic slots "scores" [b, t] float32 and "memory_positions" [b, c, m] int32, with a store
    "storage_positions" [b, c, r] int32 (what each chunk retrieved), and (not with the pallas
    implementation) "attention_mass" [b, t, 3] float32 (window, fading, eidetic: the slots and
    the retrieved tokens; see `ops.memory_attention`)."""


@struct.dataclass
class AttentionState:
    """A `MemoryAttention` layer's streaming state (float32, fixed size unless `A`).

    k, v: [b, S, h, e], ring buffer of the last S = window keys/values (slot = position % S); for
      full attention (`A`) a preallocated cache of S = max_length tokens (slot = position).
    k_fading, v_fading: [b, 2w, h, e], ring of fading keys/values (queries read w of them); None
      without fading (`A`, `W`).
    ssm: the fading SSM's `SSMState`, or None.
    eidetic: the `ops.eidetic.EideticState` of a `B` layer, or None.
    storage: the `ops.eidetic.storage.StorageState` of a `B` layer with a store, or None.
    start: int32 [b], the first position of the current document (0 unless a packed prefill
      ended inside a later document): older ring entries are invisible.
    """

    k: jax.Array
    v: jax.Array
    start: jax.Array
    k_fading: jax.Array | None = None
    v_fading: jax.Array | None = None
    ssm: SSMState | None = None
    eidetic: eidetic.EideticState | None = None
    storage: storage.StorageState | None = None


class MemoryAttention(nnx.Module):
    """Attention mixer `A`, `W`, `F` or `B` (see module docstring). [b, t, d_model] -> same."""

    def __init__(self, config: ModelConfig, letter: str, *, rngs: nnx.Rngs):
        d, dtype = config.d_model, jnp.dtype(config.dtype)
        self.n_heads, self.rope_base = config.n_heads, config.rope_base
        self.window = None if letter == "A" else config.window
        self.implementation = config.implementation
        self.loss_weight = config.innovation_loss_weight
        # hashable (frozen), so the module's graph stays a jit-static key
        self.selection = eidetic.Selection(
            window=config.window, per_chunk=config.eidetic_per_chunk, slots=config.eidetic_slots,
            lag=config.eidetic_lag, eviction=config.eidetic_eviction,
            implementation=config.implementation,
            threshold=config.eidetic_threshold if config.eidetic_selection == "threshold" else None,
            quantile=config.eidetic_quantile if config.eidetic_selection == "quantile" else None,
            whole_state=config.eidetic_selection == "state") if letter == "B" and config.eidetic_per_chunk > 0 else None
        self.rule = config.eidetic_selection
        self.seed = config.eidetic_seed
        # the in-storage memory's knobs, or None
        self.storage = storage.Knobs(config.storage_slots, config.storage_topk,
                                     config.storage_entry, config.storage_recall) if (
            letter == "B" and config.storage_slots) else None

        def linear(rngs=rngs):
            return nnx.Linear(d, d, use_bias=False, dtype=dtype, rngs=rngs)

        self.wq, self.wk, self.wv, self.wo = linear(), linear(), linear(), linear()
        self.dropout = nnx.Dropout(config.attention_dropout)
        has_fading = letter in "FB"
        self.fading = SSM(d, expand=config.fading_expand, d_state=config.d_state,
                          kind=config.ssm_kind, head_dim=config.ssm_head_dim, d_conv=config.d_conv,
                          chunk_size=config.chunk_size,
                          implementation=config.scan_implementation or config.implementation,
                          dtype=dtype, rngs=rngs) if has_fading else None
        untied = has_fading and not config.tie_fading_kv
        self.wk_fading = linear() if untied else None
        self.wv_fading = linear() if untied else None
        innovation = self.selection is not None and self.rule in INNOVATION_RULES
        self.predictor = linear() if innovation and config.innovation_predictor == "linear" else None
        self.scorer = nnx.Linear(d, 1, use_bias=False, dtype=jnp.float32, rngs=rngs) if (
            self.selection is not None and self.rule == "learned") else None

    def _heads(self, x):
        return x.reshape(x.shape[:2] + (self.n_heads, -1))

    def _qkv(self, x, positions):
        """x [b, t, d_model], positions [t] -> q, k (RoPE'd), v, each [b, t, h, e]."""
        q = ops.rope(self._heads(self.wq(x)), positions, self.rope_base)
        k = ops.rope(self._heads(self.wk(x)), positions, self.rope_base)
        return q, k, self._heads(self.wv(x))

    def _fading_kv(self, f, positions):
        """Fading tokens f [b, t, d_model] -> k_fading (RoPE'd), v_fading [b, t, h, e]."""
        wk, wv = (self.wk, self.wv) if self.wk_fading is None else (self.wk_fading, self.wv_fading)
        return ops.rope(self._heads(wk(f)), positions, self.rope_base), self._heads(wv(f))

    def _innovation(self, x, previous_f):
        """s_t = ||X_t - P(F_{t-1})||^2 [b, t] float32, target under stop-gradient."""
        prediction = previous_f if self.predictor is None else self.predictor(previous_f)
        return jnp.sum(jnp.square(jax.lax.stop_gradient(x).astype(jnp.float32)
                                  - prediction.astype(jnp.float32)), axis=-1)

    def _scores(self, x, previous_f, positions):
        """The selection rule's scores of tokens x [b, t, d_model] at `positions` [t] or [b, t]
        (in their document), whose previous fading tokens are previous_f [b, t, d_model] -> [b, t]
        float32 (see `ModelConfig.eidetic_selection`)."""
        if self.rule == "learned":
            return self.scorer(x.astype(jnp.float32))[..., 0]
        if self.rule == "random":
            key = jax.random.key(self.seed)
            draw = jnp.vectorize(lambda p: jax.random.uniform(jax.random.fold_in(key, p)))
            return jnp.broadcast_to(draw(jnp.asarray(positions)), x.shape[:2])
        if self.rule == "projection":
            direction = jax.random.normal(jax.random.key(self.seed), (x.shape[-1],))
            return jax.lax.stop_gradient(x).astype(jnp.float32) @ direction
        return self._innovation(x, previous_f)

    def _selection(self, oracle: bool):
        """The selection knobs; oracle scores are taken as they are (no threshold or quantile
        gate, no whole-state minimum)."""
        return dataclasses.replace(self.selection, threshold=None, quantile=None,
                                   whole_state=False) if (
            oracle) else self.selection

    def _slot_bias(self, scores, oracle: bool):
        """Logit bias of each key as an eidetic slot: log sigmoid(score) for the "learned" rule
        (how its scores get gradients), else None."""
        return jax.nn.log_sigmoid(scores) if self.rule == "learned" and not oracle else None

    def __call__(self, x: at.Activations) -> at.Activations:
        """x: [b, t, d_model] -> [b, t, d_model] (dtype of x)."""
        return self.prefill(x)[0]

    def prefill(self, x: at.Activations, max_length: int | None = None, context=None,
                eidetic_scores: at.Scores | None = None, dropout_key: jax.Array | None = None,
                segment_ids: at.SegmentIds | None = None
                ) -> tuple[at.Activations, AttentionState]:
        """Parallel forward over x [b, t, d_model] that also returns the streaming state after the
        last token (`AttentionState`; `max_length` sizes a full-attention cache, default t).

        `context`: a `SequenceContext` when x is one shard of a longer sequence (see module
        docstring; the returned state is then not meaningful), else None. `eidetic_scores`:
        float [b, t] scores that replace the selection rule's (an oracle; -inf = never kept), or
        None. `dropout_key`: a PRNG key (training: `attention_dropout` on the read-out, see module
        docstring), or None (deterministic). `segment_ids`: int [b, t], packed documents (see
        module docstring), or None.

        Raises:
          ValueError: `segment_ids` with `context`, or with the "state", "threshold" or
            "quantile" rule.
        """
        t = x.shape[1]
        if context is not None and self.storage is not None:
            raise ValueError("storage_slots (the in-storage memory) does not run under sequence "
                             "parallelism; use one shard.")
        if (segment_ids is not None and self.selection is not None
                and self.rule in CROSS_DOCUMENT_SELECTIONS):
            raise ValueError(f"eidetic_selection={self.rule!r} takes no segment_ids (packed "
                             f"documents; its scores read the tokens before, across documents); "
                             f"use another rule.")
        # [b, t]: the first position of each token's document
        starts = None if segment_ids is None else eidetic.document_starts(segment_ids, 1)
        # static positions in a plain forward: RoPE tables become constants (ops.rope)
        positions = np.arange(t) if context is None else context.offset + jnp.arange(t)
        q, k, v = self._qkv(x, positions)
        state = AttentionState(k=_ring(k, self._cache_length(max_length or t)),
                               v=_ring(v, self._cache_length(max_length or t)),
                               start=jnp.zeros(x.shape[:1], jnp.int32) if starts is None
                               else starts[:, -1])
        implementation = self._implementation(context, segment_ids)
        if self.window is None:
            keys, values = (k, v) if context is None else (context.all_keys(k), context.all_keys(v))
            y = ops.memory_attention(q, keys, values, q_start=0 if context is None else
                                     context.offset, segment_ids=segment_ids,
                                     implementation=implementation)
            return self._output(y, x.dtype, dropout_key), state
        w = self.window
        extend = (lambda a: a) if context is None else (lambda a: jnp.concatenate(
            [context.left(a, 2 * w), a], axis=1))  # + the 2w tokens before the shard
        keys, values, fading, memory = extend(k), extend(v), {}, {}
        if self.fading is not None:
            f, ssm_state = self.fading.prefill(x, context=context, segment_ids=segment_ids)
            kf, vf = self._fading_kv(f, positions)
            fading = dict(k_fading=extend(kf), v_fading=extend(vf))
            state = state.replace(k_fading=_ring(kf, 2 * w), v_fading=_ring(vf, 2 * w),
                                  ssm=ssm_state)
        if self.selection is not None:
            before = jnp.zeros_like(f[:, :1]) if context is None else context.left(f, 1)
            previous_f = jnp.concatenate([before, f[:, :-1]], axis=1)
            if starts is not None:  # F_{-1} = 0 at a document's first token
                previous_f = jnp.where((starts == positions)[..., None], 0.0, previous_f)
            scores = self._scores(x, previous_f,
                                  positions if starts is None else positions - starts)
            if self.rule in INNOVATION_RULES:  # the innovation predictor's loss
                loss = jnp.mean(scores) if context is None else context.mean(jnp.mean(scores))
                self.sow(nnx.Intermediate, "innovation_loss", self.loss_weight * loss)
            if eidetic_scores is not None:
                scores = eidetic_scores.astype(jnp.float32)
            if starts is not None:  # a document that ends inside a chunk: never read again
                last = np.minimum((np.arange(t) // w + 1) * w, t) - 1  # its chunk's last token
                scores = jnp.where(starts == starts[:, last], scores, -jnp.inf)
            selection = self._selection(eidetic_scores is not None)
            bias = self._slot_bias(scores, eidetic_scores is not None)
            if context is None:
                slots, scores = selection.select_with_tokens(
                    scores, x, None if starts is None else starts[:, ::w])
                memory = dict(memory_positions=slots, memory_bias=bias)
            else:
                positions_, remote_k, remote_v, remote_scores, scores = context.eidetic_keys(
                    selection, scores, k, v, x, before=2 * w)
                keys = jnp.concatenate([remote_k, keys], axis=1)
                values = jnp.concatenate([remote_v, values], axis=1)
                fading = {name: jnp.concatenate([jnp.zeros_like(remote_k), a], axis=1)
                          for name, a in fading.items()}
                if bias is not None:  # indexed like the keys: [remote; left context; shard]
                    bias = self._slot_bias(jnp.concatenate([remote_scores, extend(scores)], 1),
                                           oracle=False)
                memory = dict(memory_positions=positions_, memory_bias=bias)
            state = state.replace(eidetic=eidetic.state_after(
                selection, scores, k, v, f[:, -1], x, None if starts is None else state.start))
        if self.storage is not None:  # the retrieved tokens join the chunk's eidetic slots
            slots = memory.get("memory_positions")
            capacity, topk, entry, recall = self.storage
            stored = storage.retrieve(q, k, window=w, capacity=capacity, topk=topk,
                                      exclude=slots, entry=entry, recall=recall,
                                      starts=None if starts is None else starts[:, ::w])
            memory = dict(memory, memory_positions=stored if slots is None else
                          jnp.concatenate([slots, stored], axis=-1))
            state = state.replace(storage=storage.state_after(
                q, k, v, stored, window=w, capacity=capacity,
                exclude=None if state.eidetic is None else state.eidetic.memory.positions,
                start=None if starts is None else state.start, entry=entry, slots=slots,
                recall=recall))
        trace = (self.selection is not None or self.storage is not None) and context is None
        # (unless captured, the trace is unused: XLA removes it under jit)
        with_mass = trace and implementation != "pallas"  # removes it under jit
        # At most one window of tokens: every key is in every query's window, the fading band
        # (w back) and the slots (lag >= 1 chunk back) are empty, so the op runs full causal
        # attention and memory follows the input, not the window (our choice of where to cut).
        reads = {} if context is None and t <= w else dict(**fading, **memory)
        y = ops.memory_attention(q, keys, values, window=w, return_mass=with_mass,
                                 q_start=0 if context is None else context.offset,
                                 segment_ids=segment_ids, implementation=implementation, **reads)
        if with_mass:
            y, mass = y
            self.sow(EideticTrace, "attention_mass", mass)
        if trace and self.storage is not None:
            self.sow(EideticTrace, "storage_positions", stored)
        if trace and self.selection is not None:
            self.sow(EideticTrace, "scores", scores)
            self.sow(EideticTrace, "memory_positions", slots)
        return self._output(y, x.dtype, dropout_key), state

    def _output(self, y, dtype, dropout_key):
        """The read-out y [b, t, h, e] -> W_o(dropout(y)) [b, t, d_model] in `dtype`."""
        y = y.reshape(y.shape[:2] + (-1,)).astype(dtype)
        return self.wo(self.dropout(y, deterministic=dropout_key is None, rngs=dropout_key))

    def _implementation(self, context, segment_ids):
        """The attention implementation: the config's, but `xla` where the pallas kernels cannot
        serve (our choice: documented, not an error): under sequence parallelism (a key prefix),
        for packed documents and for the "learned" rule (the slots' logit bias)."""
        pallas = self.implementation == "pallas"
        unserved = context is not None or segment_ids is not None or self.rule == "learned"
        return "xla" if pallas and unserved else self.implementation

    # ------------------------------------------------------------------------- streaming

    def _cache_length(self, max_length):
        return self.window if self.window is not None else max_length

    def init_state(self, batch_size: int, max_length: int | None = None) -> AttentionState:
        """Empty streaming state (see `AttentionState`).

        Raises:
          ValueError: a full-attention layer without max_length.
        """
        if self.window is None and not max_length:
            raise ValueError("A full-attention (`A`) layer needs max_length (tokens) for its cache.")
        d = self.wq.in_features
        e = d // self.n_heads
        zeros = lambda *shape: jnp.zeros(shape, jnp.float32)  # noqa: E731
        size = self._cache_length(max_length)
        state = AttentionState(k=zeros(batch_size, size, self.n_heads, e),
                               v=zeros(batch_size, size, self.n_heads, e),
                               start=jnp.zeros((batch_size,), jnp.int32))
        if self.fading is not None:
            state = state.replace(ssm=self.fading.init_state(batch_size),
                                  k_fading=zeros(batch_size, 2 * self.window, self.n_heads, e),
                                  v_fading=zeros(batch_size, 2 * self.window, self.n_heads, e))
        if self.selection is not None:
            state = state.replace(eidetic=eidetic.init_state(self.selection, batch_size,
                                                             self.n_heads, e, d))
        if self.storage is not None:
            state = state.replace(storage=storage.init_state(
                batch_size, self.n_heads, e, window=self.window, capacity=self.storage.capacity,
                topk=self.storage.topk, entry=self.storage.entry))
        return state

    def step(self, x: at.StepFeatures, state: AttentionState, position: at.IntScalar,
             eidetic_scores: at.StepScores | None = None) -> tuple[at.StepFeatures, AttentionState]:
        """One token x [b, d_model] at `position` (int32 scalar) -> (y [b, d_model], next state).
        `eidetic_scores`: float [b], the oracle's score of this token (as in `prefill`), or None."""
        b, d = x.shape
        pos = position[None]
        q, k, v = self._qkv(x[:, None], pos)
        size = state.k.shape[1]
        state = state.replace(k=state.k.at[:, position % size].set(k[:, 0]),
                              v=state.v.at[:, position % size].set(v[:, 0]))
        keys, values = [state.k], [state.v]
        masks = [_ring_visible(position, size, 0, size, state.start)]
        if self.fading is not None:
            f, ssm_state = self.fading.step(x, state.ssm)
            kf, vf = self._fading_kv(f[:, None], pos)
            slot = position % (2 * self.window)
            state = state.replace(ssm=ssm_state,
                                  k_fading=state.k_fading.at[:, slot].set(kf[:, 0]),
                                  v_fading=state.v_fading.at[:, slot].set(vf[:, 0]))
            keys.append(state.k_fading)
            values.append(state.v_fading)
            masks.append(_ring_visible(position, 2 * self.window, self.window, 2 * self.window,
                                       state.start))
        bias = None
        if self.selection is not None:
            memory = state.eidetic.memory
            keys.append(memory.k)
            values.append(memory.v)
            masks.append(memory.positions >= 0)
            slot_bias = self._slot_bias(memory.scores, eidetic_scores is not None)
            if slot_bias is not None:
                bias = jnp.concatenate([jnp.zeros((b, sum(m.shape[1] for m in masks[:-1]))),
                                        slot_bias], axis=1)
        if self.storage is not None:  # what the current chunk retrieved
            keys.append(state.storage.retrieved_k)
            values.append(state.storage.retrieved_v)
            masks.append(state.storage.retrieved >= 0)
        y = ops.attend_one(q[:, 0], jnp.concatenate(keys, 1), jnp.concatenate(values, 1),
                           jnp.concatenate(masks, 1), bias=bias)
        if self.selection is not None:
            held = state.eidetic.memory  # the slots before this token
            score = self._scores(x[:, None], state.eidetic.previous_f[:, None],
                                 (position - state.start)[:, None])[:, 0]
            if eidetic_scores is not None:
                score = eidetic_scores.astype(jnp.float32)
            state = state.replace(eidetic=eidetic.update(
                self._selection(eidetic_scores is not None), state.eidetic, score, f, position,
                state.k, state.v, x))
        if self.storage is not None:
            evicted = None
            if self.storage.entry == "evicted":  # the slots this token's chunk end evicted
                now = state.eidetic.memory.positions
                gone = (held.positions >= 0) & ~jnp.any(
                    held.positions[:, :, None] == now[:, None, :], axis=-1)
                evicted = (jnp.where(gone, held.positions, -1), held.k, held.v)
            state = state.replace(storage=storage.update(
                state.storage, q[:, 0], k[:, 0], v[:, 0], position, window=self.window,
                capacity=self.storage.capacity,
                exclude=None if state.eidetic is None else state.eidetic.memory.positions,
                start=state.start, evicted=evicted, recall=self.storage.recall))
        return self.wo(y.reshape(b, d).astype(x.dtype)), state


def _ring(x, size):
    """The last `size` tokens of x [b, t, ...] in a ring buffer [b, size, ...]: position p sits in
    slot p % size; slots of positions < 0 are zero."""
    t = x.shape[1]
    positions = np.arange(t - size, t)
    tokens = jnp.where((positions >= 0).reshape((1, size) + (1,) * (x.ndim - 2)),
                       x[:, np.maximum(positions, 0)], 0)
    return jnp.zeros((x.shape[0], size) + x.shape[2:], jnp.float32).at[:, positions % size].set(
        tokens.astype(jnp.float32))


def _ring_visible(position, size, lo, hi, start):
    """[b, size] bool: ring slots whose token (at position - d, d = (position - slot) % size) is at
    a distance lo <= d < hi behind `position` and at a position >= start [b] (the document's
    first; 0 for one document)."""
    distance = (position - jnp.arange(size)) % size
    near = (distance >= lo) & (distance < hi)
    return near[None] & (position - distance[None] >= start[:, None])
