"""One attention mixer for the whole family: `A`, `W`, `F` (B'MOJO-F) and `B` (B'MOJO).

Input X [b, t, d_model] (already RMS-normed by the block). With w = window (= chunk size):

    A  full causal attention over X.
    W  attention over the in-context window: keys j in [i-w+1, i].
    F  + fading tokens F = SSM(X): keys K_f, V_f from F at j in [i-2w+1, i-w], one softmax.
    B  + eidetic tokens: keys/values of X at positions chosen by the innovation test.

Q, K, V come from X, K_f, V_f from F (through the same projections when `tie_fading_kv`, DESIGN.md
section 2); RoPE sits at every token's true position, for eidetic tokens their original one.

Eidetic memory (`B`; our choices, config knobs in brackets). The innovation of token t is
    s_t = || X_t - P(F_{t-1}) ||^2,     F_{-1} = 0,
with P [innovation_predictor: identity | linear] trained by the auxiliary loss
mean_t ||sg(X_t) - P(F_{t-1})||^2 [innovation_loss_weight], sown as the `nnx.Intermediate`
`innovation_loss` (`LanguageModel.forward` collects it for the training loss). Selection is discrete: top [eidetic_per_chunk] per
chunk, visible [eidetic_lag] chunks later, [eidetic_slots] slots, [eidetic_eviction] fifo | score;
see `ops.eidetic` for tie-breaking and padding. Padding (t not a multiple of w) is never selected and
never seen by a real query. The "fading state plus a read of the eidetic memory" predictor variant of
DESIGN.md is not implemented: P reads the fading tokens only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bmojo_jax import ops
from bmojo_jax.config import ModelConfig
from bmojo_jax.layers.ssm import SSM


class MemoryAttention(nnx.Module):
    """Attention mixer `A`, `W`, `F` or `B` (see module docstring). [b, t, d_model] -> same."""

    def __init__(self, config: ModelConfig, letter: str, *, rngs: nnx.Rngs):
        d, dtype = config.d_model, jnp.dtype(config.dtype)
        self.n_heads, self.rope_base = config.n_heads, config.rope_base
        self.window = None if letter == "A" else config.window
        self.implementation = config.implementation
        self.eidetic = letter == "B" and config.eidetic_per_chunk > 0
        self.config = config  # hashable (frozen), so the module's graph stays a jit-static key
        self.loss_weight = config.innovation_loss_weight

        def linear(rngs=rngs):
            return nnx.Linear(d, d, use_bias=False, dtype=dtype, rngs=rngs)

        self.wq, self.wk, self.wv, self.wo = linear(), linear(), linear(), linear()
        has_fading = letter in "FB"
        self.fading = SSM(d, expand=config.fading_expand, d_state=config.d_state,
                          kind=config.ssm_kind, head_dim=config.ssm_head_dim, d_conv=config.d_conv,
                          chunk_size=config.chunk_size,
                          implementation=config.scan_implementation or config.implementation,
                          dtype=dtype, rngs=rngs) if has_fading else None
        untied = has_fading and not config.tie_fading_kv
        self.wk_fading = linear() if untied else None
        self.wv_fading = linear() if untied else None
        linear_predictor = self.eidetic and config.innovation_predictor == "linear"
        self.predictor = linear() if linear_predictor else None

    @property
    def select(self):
        """Keyword arguments of `ops.select_eidetic` for this layer."""
        c = self.config
        return dict(window=c.window, per_chunk=c.eidetic_per_chunk, slots=c.eidetic_slots,
                    lag=c.eidetic_lag, eviction=c.eidetic_eviction, implementation=c.implementation)

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

    def __call__(self, x):
        """x: [b, t, d_model] -> [b, t, d_model] (dtype of x)."""
        return self.prefill(x)[0]

    def prefill(self, x, max_length=None):
        """Parallel forward over x [b, t, d_model] that also returns the streaming state after the
        last token (see `init_state`; `max_length` sizes a full-attention cache, default t)."""
        b, t, d = x.shape
        positions = np.arange(t)  # static: RoPE tables become constants (ops.rope)
        q, k, v = self._qkv(x, positions)
        state = {"k": _ring(k, self._cache_length(max_length or t)),
                 "v": _ring(v, self._cache_length(max_length or t))}
        fading, memory_positions = {}, None
        if self.fading is not None:
            f, state["ssm"] = self.fading.prefill(x)
            kf, vf = self._fading_kv(f, positions)
            fading = dict(k_fading=kf, v_fading=vf)
            state["k_fading"], state["v_fading"] = _ring(kf, 2 * self.window), _ring(vf, 2 * self.window)
            if self.eidetic:
                error = self._innovation(x, jnp.pad(f, [(0, 0), (1, 0), (0, 0)])[:, :-1])
                self.sow(nnx.Intermediate, "innovation_loss", self.loss_weight * jnp.mean(error))
                memory_positions = ops.select_eidetic(error, **self.select)
                state.update(self._eidetic_state(error, k, v, f))
        y = ops.memory_attention(q, k, v, window=self.window, memory_positions=memory_positions,
                                 implementation=self.implementation, **fading)
        return self.wo(y.reshape(b, t, d).astype(x.dtype)), state

    # ------------------------------------------------------------------------- streaming

    def _cache_length(self, max_length):
        return self.window if self.window is not None else max_length

    def init_state(self, batch_size: int, max_length=None):
        """Empty streaming state: a fixed-size pytree of float32/int32 arrays.

        k, v [b, S, h, e]: ring buffer of the last S = window keys/values (full attention: a
          preallocated cache of S = max_length tokens, slot = position).
        k_fading, v_fading [b, 2w, h, e]: ring of fading keys/values (queries read w of them).
        ssm: the fading SSM's state. Eidetic (`B`): memory_{positions,scores} [b, m],
          memory_{k,v} [b, m, h, e]; the lag - 1 selections not yet visible, pending_* [b, L-1, k];
          chunk_scores [b, w] of the current chunk's candidates; previous_f [b, d_model].

        Raises:
          ValueError: a full-attention layer without max_length.
        """
        if self.window is None and not max_length:
            raise ValueError("A full-attention (`A`) layer needs max_length (tokens) for its cache.")
        e = self.wq.in_features // self.n_heads
        zeros = lambda *shape: jnp.zeros(shape, jnp.float32)  # noqa: E731
        size = self._cache_length(max_length)
        state = {"k": zeros(batch_size, size, self.n_heads, e),
                 "v": zeros(batch_size, size, self.n_heads, e)}
        if self.fading is not None:
            state["ssm"] = self.fading.init_state(batch_size)
            state["k_fading"] = zeros(batch_size, 2 * self.window, self.n_heads, e)
            state["v_fading"] = zeros(batch_size, 2 * self.window, self.n_heads, e)
        if self.eidetic:
            slots, per_chunk, lag = (self.select[key] for key in ("slots", "per_chunk", "lag"))
            state.update(
                memory_positions=jnp.full((batch_size, slots), -1, jnp.int32),
                memory_scores=jnp.full((batch_size, slots), -jnp.inf, jnp.float32),
                memory_k=zeros(batch_size, slots, self.n_heads, e),
                memory_v=zeros(batch_size, slots, self.n_heads, e),
                pending_positions=jnp.full((batch_size, lag - 1, per_chunk), -1, jnp.int32),
                pending_scores=jnp.full((batch_size, lag - 1, per_chunk), -jnp.inf, jnp.float32),
                pending_k=zeros(batch_size, lag - 1, per_chunk, self.n_heads, e),
                pending_v=zeros(batch_size, lag - 1, per_chunk, self.n_heads, e),
                chunk_scores=jnp.full((batch_size, self.window), -jnp.inf, jnp.float32),
                previous_f=zeros(batch_size, self.wq.in_features))
        return state

    def step(self, x, state, position):
        """One token x [b, d_model] at `position` (int32 scalar) -> (y [b, d_model], next state)."""
        b, d = x.shape
        pos = position[None]
        q, k, v = self._qkv(x[:, None], pos)
        state = dict(state)
        size = state["k"].shape[1]
        state["k"] = state["k"].at[:, position % size].set(k[:, 0])
        state["v"] = state["v"].at[:, position % size].set(v[:, 0])
        keys, values = [state["k"]], [state["v"]]
        masks = [_ring_visible(position, size, 0, size)]
        if self.fading is not None:
            f, state["ssm"] = self.fading.step(x, state["ssm"])
            kf, vf = self._fading_kv(f[:, None], pos)
            slot = position % (2 * self.window)
            state["k_fading"] = state["k_fading"].at[:, slot].set(kf[:, 0])
            state["v_fading"] = state["v_fading"].at[:, slot].set(vf[:, 0])
            keys.append(state["k_fading"])
            values.append(state["v_fading"])
            masks.append(_ring_visible(position, 2 * self.window, self.window, 2 * self.window))
        masks = [jnp.broadcast_to(m, (b, m.shape[-1])) for m in masks]
        if self.eidetic:
            score = self._innovation(x[:, None], state["previous_f"][:, None])[:, 0]
            state["chunk_scores"] = state["chunk_scores"].at[:, position % self.window].set(score)
            state["previous_f"] = f.astype(jnp.float32)
            keys.append(state["memory_k"])
            values.append(state["memory_v"])
            masks.append(state["memory_positions"] >= 0)
        y = ops.attend_one(q[:, 0], jnp.concatenate(keys, 1), jnp.concatenate(values, 1),
                           jnp.concatenate(masks, 1))
        if self.eidetic:
            state = jax.lax.cond((position + 1) % self.window == 0,
                                 lambda s: self._end_chunk(s, position), lambda s: s, state)
        return self.wo(y.reshape(b, d).astype(x.dtype)), state

    def _end_chunk(self, state, position):
        """At the last token of a chunk: select its top-k, queue them `lag` chunks, evict."""
        per_chunk, slots, lag = (self.select[key] for key in ("per_chunk", "slots", "lag"))
        scores, index = jax.lax.top_k(state["chunk_scores"], per_chunk)  # stable, as chunk_topk
        take = lambda ring: jnp.take_along_axis(ring, index[:, :, None, None], axis=1)  # noqa
        new = {"positions": position + 1 - self.window + index.astype(jnp.int32),
               "scores": scores, "k": take(state["k"]), "v": take(state["v"])}
        state = dict(state, chunk_scores=jnp.full_like(state["chunk_scores"], -jnp.inf))
        if lag > 1:
            arriving = {key: state["pending_" + key][:, 0] for key in new}
            for key in new:
                state["pending_" + key] = jnp.concatenate(
                    [state["pending_" + key][:, 1:], new[key][:, None]], axis=1)
        else:
            arriving = new
        merged = {key: jnp.concatenate([state["memory_" + key], arriving[key]], axis=1)
                  for key in new}
        if self.select["eviction"] == "fifo":  # slots are kept oldest first, in groups of k
            keep = {key: value[:, per_chunk:] for key, value in merged.items()}
        else:  # running top-m by score, ties to the older entry
            _, order = jax.lax.top_k(merged["scores"], slots)
            keep = {key: jnp.take_along_axis(value, order.reshape(order.shape + (1,) * (value.ndim - 2)),
                                             axis=1) for key, value in merged.items()}
        state.update({"memory_" + key: value for key, value in keep.items()})
        return state

    def _eidetic_state(self, error, k, v, f):
        """Eidetic streaming state after a parallel pass over t tokens (see `init_state`)."""
        per_chunk, lag = self.select["per_chunk"], self.select["lag"]
        b, t = error.shape
        w = self.window
        current = t // w  # the chunk of the next token
        padded = jnp.pad(error, [(0, 0), (0, (current + 1) * w - t)], constant_values=-jnp.inf)
        memory = ops.select_eidetic(padded, **self.select)[:, current]  # [b, m]
        if self.select["eviction"] == "fifo":
            memory = jnp.sort(memory, axis=-1)  # oldest first: -1 slots are the oldest chunks
        selected, selected_scores = ops.chunk_topk(padded, w, per_chunk)
        chunks = np.arange(current - lag + 1, current)  # pending: selected, not yet visible
        pending = jnp.where((chunks >= 0)[None, :, None], selected[:, np.maximum(chunks, 0)], -1)
        gather = lambda x, p: jax.vmap(lambda xb, pb: xb[pb])(x, jnp.maximum(p, 0))  # noqa: E731
        score_of = lambda p: jnp.where(p >= 0, gather(error, p), -jnp.inf)  # noqa: E731
        return dict(
            memory_positions=memory, memory_scores=score_of(memory),
            memory_k=gather(k, memory).astype(jnp.float32),
            memory_v=gather(v, memory).astype(jnp.float32),
            pending_positions=pending, pending_scores=score_of(pending),
            pending_k=gather(k, pending).astype(jnp.float32),
            pending_v=gather(v, pending).astype(jnp.float32),
            chunk_scores=padded[:, current * w:], previous_f=f[:, -1].astype(jnp.float32))


def _ring(x, size):
    """The last `size` tokens of x [b, t, ...] in a ring buffer [b, size, ...]: position p sits in
    slot p % size; slots of positions < 0 are zero."""
    t = x.shape[1]
    positions = np.arange(t - size, t)
    tokens = jnp.where((positions >= 0).reshape((1, size) + (1,) * (x.ndim - 2)),
                       x[:, np.maximum(positions, 0)], 0)
    return jnp.zeros((x.shape[0], size) + x.shape[2:], jnp.float32).at[:, positions % size].set(
        tokens.astype(jnp.float32))


def _ring_visible(position, size, lo, hi):
    """[size] bool: ring slots whose token (at position - d, d = (position - slot) % size) is at a
    distance lo <= d < hi behind `position` and at a position >= 0."""
    distance = (position - jnp.arange(size)) % size
    return (distance >= lo) & (distance < hi) & (distance <= position)
