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
        self.select = dict(window=config.window, per_chunk=config.eidetic_per_chunk,
                           slots=config.eidetic_slots, lag=config.eidetic_lag,
                           eviction=config.eidetic_eviction, implementation=config.implementation)
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

    def _heads(self, x):
        return x.reshape(x.shape[:2] + (self.n_heads, -1))

    def __call__(self, x):
        """x: [b, t, d_model] -> [b, t, d_model] (dtype of x)."""
        b, t, d = x.shape
        positions = jnp.arange(t)
        q = ops.rope(self._heads(self.wq(x)), positions, self.rope_base)
        k = ops.rope(self._heads(self.wk(x)), positions, self.rope_base)
        v = self._heads(self.wv(x))
        fading = {}
        memory_positions = None
        if self.fading is not None:
            f = self.fading(x)
            wk, wv = (self.wk, self.wv) if self.wk_fading is None else (self.wk_fading,
                                                                       self.wv_fading)
            fading = dict(k_fading=ops.rope(self._heads(wk(f)), positions, self.rope_base),
                          v_fading=self._heads(wv(f)))
            if self.eidetic:
                memory_positions = self._select(x, f)
        y = ops.memory_attention(q, k, v, window=self.window, memory_positions=memory_positions,
                                 implementation=self.implementation, **fading)
        return self.wo(y.reshape(b, t, d).astype(x.dtype))

    def _select(self, x, f):
        """Innovation scores, the auxiliary predictor loss, and the eidetic slots [b, c, m]."""
        previous = jnp.pad(f, [(0, 0), (1, 0), (0, 0)])[:, :-1]  # F_{t-1}, zeros at t = 0
        prediction = previous if self.predictor is None else self.predictor(previous)
        error = jnp.sum(jnp.square(jax.lax.stop_gradient(x).astype(jnp.float32)
                                   - prediction.astype(jnp.float32)), axis=-1)  # [b, t]
        self.sow(nnx.Intermediate, "innovation_loss", self.loss_weight * jnp.mean(error))
        return ops.select_eidetic(error, **self.select)
