"""The selective-SSM mixer (`M`), also the fading path inside B'MOJO's `F` and `B` mixers.

    x [b, t, d_model] -> in_proj -> (z, xBC, dt) -> causal depthwise conv + SiLU on xBC
      -> scan(x, dt, A, B, C) + D x -> * SiLU(z) -> out_proj -> [b, t, d_model]

Both kinds share this Mamba-2 layout (our choice, so that the kinds differ only in the decay):
    mamba2  one scalar decay per head, heads of `ssm_head_dim` channels, the SSD scan (`ops.ssd`);
    mamba1  a decay per channel and state, dt from a rank-ceil(d_model/16) projection
            (`ops.selective_scan`).
Initialisation follows the Mamba papers: A = -[1..16] (mamba2: uniform per head; mamba1: 1..n per
state), dt in [1e-3, 1e-1] log-uniform via the bias of a softplus, D = 1. The dynamics parameters are
named `A_log`, `dt_bias`, `D` so that the optimizer can exclude them from weight decay.

Streaming (DESIGN.md section 5): the recurrent state is {"conv": the last d_conv - 1 conv inputs
[b, d_conv - 1, inner + 2 n], "ssm": the scan state h}, a fixed size whatever the context.
`prefill(x)` runs the parallel scan and returns that state; `step(x, state)` consumes one token.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from bmojo_jax import ops


def _dt_bias(key, shape, dt_min=1e-3, dt_max=1e-1):
    dt = jnp.exp(jax.random.uniform(key, shape) * (math.log(dt_max) - math.log(dt_min))
                 + math.log(dt_min))
    return dt + jnp.log(-jnp.expm1(-dt))  # inverse softplus


class SSM(nnx.Module):
    """Selective state-space mixer. Input and output [batch, time, d_model]."""

    def __init__(self, d_model: int, *, expand: int, d_state: int, kind: str, head_dim: int,
                 d_conv: int, chunk_size: int, implementation, dtype, rngs: nnx.Rngs):
        inner = expand * d_model
        self.kind, self.inner, self.d_state = kind, inner, d_state
        self.chunk_size, self.implementation = chunk_size, implementation
        if kind == "mamba2":
            self.n_heads = inner // head_dim
            dt_in, decay_shape = self.n_heads, (self.n_heads,)
            a_init = jnp.log(jax.random.uniform(rngs.params(), decay_shape, minval=1.0, maxval=16.0))
            self.dt_proj = None
        else:
            dt_in, decay_shape = math.ceil(d_model / 16), (inner,)
            a_init = jnp.log(jnp.broadcast_to(jnp.arange(1, d_state + 1, dtype=jnp.float32),
                                              (inner, d_state)))
            self.dt_proj = nnx.Linear(dt_in, inner, use_bias=False, dtype=dtype, rngs=rngs)
        self.splits = (inner, 2 * inner + 2 * d_state)  # z | x B C | dt
        self.in_proj = nnx.Linear(d_model, self.splits[1] + dt_in, use_bias=False, dtype=dtype,
                                  rngs=rngs)
        conv_dim = inner + 2 * d_state
        self.conv = nnx.Conv(conv_dim, conv_dim, kernel_size=(d_conv,), padding="CAUSAL",
                             feature_group_count=conv_dim, dtype=dtype, rngs=rngs)
        self.A_log = nnx.Param(a_init)
        self.dt_bias = nnx.Param(_dt_bias(rngs.params(), decay_shape))
        self.D = nnx.Param(jnp.ones((inner,), jnp.float32))
        self.out_proj = nnx.Linear(inner, d_model, use_bias=False, dtype=dtype, rngs=rngs)

    def init_state(self, batch_size: int, max_length=None):
        """Zero recurrent state for `batch_size` sequences (float32). `max_length` is unused (a
        fixed-size state), accepted for the mixers' common interface."""
        h = ((batch_size, self.n_heads, self.inner // self.n_heads, self.d_state)
             if self.kind == "mamba2" else (batch_size, self.inner, self.d_state))
        conv = self.conv.kernel.shape
        return {"conv": jnp.zeros((batch_size, conv[0] - 1, conv[2]), jnp.float32),
                "ssm": jnp.zeros(h, jnp.float32)}

    def __call__(self, x):
        """x: [b, t, d_model] -> [b, t, d_model] (dtype of x)."""
        return self.prefill(x)[0]

    def prefill(self, x, max_length=None):
        """x: [b, t, d_model] -> (y [b, t, d_model], the recurrent state after the last token)."""
        z, xbc, dt = jnp.split(self.in_proj(x), self.splits, axis=-1)
        width = self.conv.kernel.shape[0] - 1
        conv_state = jnp.pad(xbc, [(0, 0), (width, 0), (0, 0)])[:, xbc.shape[1]:]
        xbc_conv = jax.nn.silu(self._causal_conv(xbc))
        y, h_last = self._mix(z, xbc_conv, dt, None, self.implementation)
        return y.astype(x.dtype), {"conv": conv_state.astype(jnp.float32), "ssm": h_last}

    def _causal_conv(self, x):
        """The causal depthwise convolution of `self.conv` on x [b, t, channels], as d_conv shifted
        multiply-adds. Same result as `self.conv(x)`; XLA:CPU runs a grouped (depthwise) convolution
        as a dense one (channels times the work): 9x slower fwd+bwd at [4, 2048, 544]."""
        dtype = self.conv.dtype or x.dtype
        kernel = self.conv.kernel[...][:, 0, :].astype(dtype)  # [d_conv, channels]
        width, t = kernel.shape[0] - 1, x.shape[1]
        padded = jnp.pad(x.astype(dtype), [(0, 0), (width, 0), (0, 0)])
        out = self.conv.bias[...].astype(dtype)
        for i in range(width + 1):
            out = out + padded[:, i:i + t] * kernel[i]
        return out

    def step(self, x, state, position=None):
        """One token: x [b, d_model], state -> (y [b, d_model], next state). `position` is unused
        (the SSM is position-free), accepted for the mixers' common interface."""
        z, xbc, dt = jnp.split(self.in_proj(x)[:, None], self.splits, axis=-1)
        window = jnp.concatenate([state["conv"], xbc.astype(jnp.float32)], axis=1)
        conv = jnp.einsum("bkc,kc->bc", window, self.conv.kernel[:, 0, :]) + self.conv.bias[...]
        y, h = self._mix(z, jax.nn.silu(conv)[:, None], dt, state["ssm"], "reference")
        return y[:, 0].astype(x.dtype), {"conv": window[:, 1:], "ssm": h}

    def dynamics(self, xbc, dt):
        """Scan inputs from the conv output xbc [b, t, inner + 2n] and the raw dt features:
        (x [b, t, inner], B, C [b, t, n], dt float32 [b, t, heads or inner] after softplus,
        a float32 [heads] or [inner, n], negative)."""
        xs, B, C = jnp.split(xbc, (self.inner, self.inner + self.d_state), axis=-1)
        if self.dt_proj is not None:
            dt = self.dt_proj(dt)
        dt = jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias[...])
        return xs, B, C, dt, -jnp.exp(self.A_log[...])

    def _mix(self, z, xbc, dt, h0, implementation):
        """Scan and gate: z, xbc, dt as split from in_proj ([b, t, ...]) -> (y [b, t, d_model], h)."""
        b, t, _ = xbc.shape
        xs, B, C, dt, a = self.dynamics(xbc, dt)
        if self.kind == "mamba2":
            y, h = ops.ssd(xs.reshape(b, t, self.n_heads, -1), dt, a, B, C, h0,
                           chunk_size=self.chunk_size, implementation=implementation)
            y = y.reshape(b, t, self.inner)
        else:
            y, h = ops.selective_scan(xs, dt, a, B, C, h0, chunk_size=self.chunk_size,
                                      implementation=implementation)
        y = (y + xs * self.D[...]) * jax.nn.silu(z)
        return self.out_proj(y.astype(z.dtype)), h
