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

Streaming (docs/design.md section 5): the recurrent state is an `SSMState` (the last d_conv - 1
conv inputs and the scan state h), a fixed size whatever the context. `prefill(x)` runs the
parallel scan and returns that state; `step(x, state)` consumes one token.

Packed documents (`prefill(x, segment_ids=...)`): the conv reads no token of another document, the
scan restarts from a zero state at every document (`ops.ssd` / `ops.selective_scan`; the pallas
scans take no segment_ids, so the `xla` ones run: our choice), and the returned state is the last
document's (its conv inputs only), so decoding continues that document as if it had run alone.

Sequence parallelism (`prefill(x, context=...)`, a `SequenceContext`): the conv takes its
d_conv - 1 tokens of left context from the previous shard, and the scan runs from a zero state;
the state H entering the shard (from every shard's zero-start final state and total decay,
`SequenceContext.carried_state`) then adds its contribution analytically (our choice, one einsum
instead of a second scan): the true state at local step t is h0_t + exp(a * cumsum(dt)_t) H, so
y_t gains C_t . (exp(a * cumsum(dt)_t) H), which passes through the gate and out_proj linearly.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from bmojo_jax import array_typing as at
from bmojo_jax import ops


@struct.dataclass
class SSMState:
    """The SSM mixer's streaming state (float32, fixed size).

    conv: [b, d_conv - 1, inner + 2 n], the last conv inputs.
    ssm: the scan state h, [b, heads, p, n] (mamba2) or [b, inner, n] (mamba1).
    """

    conv: jax.Array
    ssm: jax.Array


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

    def init_state(self, batch_size: int, max_length: int | None = None) -> SSMState:
        """Zero recurrent state for `batch_size` sequences (float32). `max_length` is unused (a
        fixed-size state), accepted for the mixers' common interface."""
        h = ((batch_size, self.n_heads, self.inner // self.n_heads, self.d_state)
             if self.kind == "mamba2" else (batch_size, self.inner, self.d_state))
        conv = self.conv.kernel.shape
        return SSMState(conv=jnp.zeros((batch_size, conv[0] - 1, conv[2]), jnp.float32),
                        ssm=jnp.zeros(h, jnp.float32))

    def __call__(self, x: at.Activations) -> at.Activations:
        """x: [b, t, d_model] -> [b, t, d_model] (dtype of x)."""
        return self.prefill(x)[0]

    def prefill(self, x: at.Activations, max_length: int | None = None, context=None,
                segment_ids: at.SegmentIds | None = None) -> tuple[at.Activations, SSMState]:
        """x: [b, t, d_model] -> (y [b, t, d_model], the `SSMState` after the last token).

        `context`: a `SequenceContext` when x is one shard of a longer sequence, else None;
        `segment_ids`: int [b, t], packed documents, or None (see module docstring).

        Raises:
          ValueError: both `context` and `segment_ids` (not implemented).
        """
        if context is not None and segment_ids is not None:
            raise ValueError("segment_ids (packed documents) do not run under sequence "
                             "parallelism; pack shorter rows instead.")
        z, xbc, dt = jnp.split(self.in_proj(x), self.splits, axis=-1)
        width = self.conv.kernel.shape[0] - 1
        left = (jnp.zeros(xbc.shape[:1] + (width,) + xbc.shape[2:], xbc.dtype) if context is None
                else context.left(xbc, width))
        conv_state = jnp.concatenate([left, xbc], axis=1)[:, xbc.shape[1]:]
        if segment_ids is not None and width:  # keep the last document's conv inputs only
            ids = jnp.pad(segment_ids, [(0, 0), (width, 0)], mode="edge")[:, -width:]
            conv_state = jnp.where((ids == segment_ids[:, -1:])[..., None], conv_state, 0)
        xbc = jax.nn.silu(self._causal_conv(xbc, left, segment_ids))
        xs, B, C, dt, a = self.dynamics(xbc, dt)
        implementation = self.implementation
        if segment_ids is not None and implementation == "pallas":
            implementation = "xla"
        y, h_last = self._scan(xs, dt, a, B, C, None, implementation, segment_ids)
        if context is not None:
            carried, h_last = self._carried(context, C, dt, a, h_last)
            y = y + carried
        y = self._gate_out(y, xs, z)
        return y.astype(x.dtype), SSMState(conv=conv_state.astype(jnp.float32), ssm=h_last)

    def _causal_conv(self, x, left, segment_ids=None):
        """The causal depthwise convolution of `self.conv` on x [b, t, channels] after its left
        context `left` [b, d_conv - 1, channels], as d_conv shifted multiply-adds. Same result as
        `self.conv`; XLA:CPU runs a grouped (depthwise) convolution as a dense one (channels times
        the work): 9x slower fwd+bwd at [4, 2048, 544]. With segment_ids [b, t], a token's
        window reads no token of another document (the left context belongs to the first)."""
        dtype = self.conv.dtype or x.dtype
        kernel = self.conv.kernel[...][:, 0, :].astype(dtype)  # [d_conv, channels]
        padded = jnp.concatenate([left.astype(dtype), x.astype(dtype)], axis=1)
        t, width = x.shape[1], left.shape[1]
        ids = None if segment_ids is None else jnp.pad(segment_ids, [(0, 0), (width, 0)],
                                                       mode="edge")
        out = self.conv.bias[...].astype(dtype)
        for i in range(kernel.shape[0]):
            term = padded[:, i:i + t] * kernel[i]
            if ids is not None and i < width:  # i = width: the token itself
                term = jnp.where((ids[:, i:i + t] == segment_ids)[..., None], term, 0)
            out = out + term
        return out

    def step(self, x: at.StepFeatures, state: SSMState, position: at.IntScalar | None = None
             ) -> tuple[at.StepFeatures, SSMState]:
        """One token: x [b, d_model], state -> (y [b, d_model], next state). `position` is unused
        (the SSM is position-free), accepted for the mixers' common interface."""
        z, xbc, dt = jnp.split(self.in_proj(x)[:, None], self.splits, axis=-1)
        xs, B, C, dt, a = self.dynamics(jax.nn.silu(self._causal_conv(xbc, state.conv)), dt)
        y, h = self._scan(xs, dt, a, B, C, state.ssm, "reference")
        conv = jnp.concatenate([state.conv, xbc.astype(jnp.float32)], axis=1)[:, 1:]
        return self._gate_out(y, xs, z)[:, 0].astype(x.dtype), SSMState(conv=conv, ssm=h)

    def dynamics(self, xbc, dt):
        """Scan inputs from the conv output xbc [b, t, inner + 2n] and the raw dt features:
        (x [b, t, inner], B, C [b, t, n], dt float32 [b, t, heads or inner] after softplus,
        a float32 [heads] or [inner, n], negative)."""
        xs, B, C = jnp.split(xbc, (self.inner, self.inner + self.d_state), axis=-1)
        if self.dt_proj is not None:
            dt = self.dt_proj(dt)
        dt = jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias[...])
        return xs, B, C, dt, -jnp.exp(self.A_log[...])

    def _scan(self, xs, dt, a, B, C, h0, implementation, segment_ids=None):
        """The selective scan: xs [b, t, inner] -> (y [b, t, inner] float32, final state h)."""
        b, t, _ = xs.shape
        if self.kind == "mamba2":
            y, h = ops.ssd(xs.reshape(b, t, self.n_heads, -1), dt, a, B, C, h0,
                           segment_ids=segment_ids, chunk_size=self.chunk_size,
                           implementation=implementation)
            return y.reshape(b, t, self.inner), h
        return ops.selective_scan(xs, dt, a, B, C, h0, segment_ids=segment_ids,
                                  chunk_size=self.chunk_size, implementation=implementation)

    def _gate_out(self, y, xs, z):
        """Skip, gate and output projection: y, xs, z [b, t, inner] -> [b, t, d_model]."""
        y = (y + xs * self.D[...]) * jax.nn.silu(z)
        return self.out_proj(y.astype(z.dtype))

    def _carried(self, context, C, dt, a, h_last):
        """The output contribution [b, t, inner] of the state entering this shard, and the true
        final state (see module docstring)."""
        cum = jnp.cumsum(dt, axis=1)  # [b, t, heads] (mamba2) or [b, t, inner] (mamba1)
        C = C.astype(jnp.float32)
        b, t, _ = C.shape
        if self.kind == "mamba2":
            decay = jnp.exp(cum[:, -1] * a)[:, :, None, None]  # [b, h, 1, 1]
            entering = context.carried_state(h_last, decay)  # [b, h, p, n]
            y = jnp.einsum("btn,bhpn,bth->bthp", C, entering, jnp.exp(cum * a))
            y = y.reshape(b, t, self.inner)
        else:
            decay = jnp.exp(cum[:, -1, :, None] * a)  # [b, inner, n]
            entering = context.carried_state(h_last, decay)
            y = _mamba1_carried(C, cum, a, entering, self.chunk_size)
        return y, h_last + decay * entering


def _mamba1_carried(C, cum, a, entering, chunk: int):
    """y_t[d] = sum_n C_t[n] exp(cum_t[d] a[d, n]) H[d, n], over chunks of time (memory
    [b, chunk, d, n] at a time). C [b, t, n], cum [b, t, d], a [d, n], H [b, d, n] -> [b, t, d]."""
    b, t, d = cum.shape
    q = min(chunk, t)
    pad = -t % q
    C = jnp.pad(C, [(0, 0), (0, pad), (0, 0)]).reshape(b, -1, q, C.shape[-1])
    cum = jnp.pad(cum, [(0, 0), (0, pad), (0, 0)]).reshape(b, -1, q, d)

    def one(inputs):
        c_chunk, cum_chunk = inputs  # [b, q, n], [b, q, d]
        return jnp.einsum("bqn,bdn,bqdn->bqd", c_chunk, entering,
                          jnp.exp(cum_chunk[..., None] * a))

    out = jax.lax.map(one, (jnp.swapaxes(C, 0, 1), jnp.swapaxes(cum, 0, 1)))  # [c, b, q, d]
    return jnp.swapaxes(out, 0, 1).reshape(b, -1, d)[:, :t]
