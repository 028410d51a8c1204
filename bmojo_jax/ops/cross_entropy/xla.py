"""The `xla` implementation of `linear_cross_entropy`: a `lax.scan` over time chunks, gradients
in the forward pass (same signature as `reference`).

Inside this module q is the number of time steps per chunk: q = clip(chunk_size // b, 1, t), so one
scan step holds the logits of b q tokens (chunk_size tokens when b <= chunk_size). The loss is a
scalar, so its gradients are computed in the same pass
(dlogits = token_weights * (softmax - onehot), then dlogits @ head and dlogits^T @ hidden, summed
over chunks) and saved; the backward only scales them by the incoming cotangent. Differentiable
once (reverse mode); `token_weights` gets a cotangent too (the per-token NLL). The technique is the
"fused linear cross-entropy" of Liger-Kernel (Hsu et al. 2024); chunking by time (rows kept whole)
is our choice, so a batch sharded over devices stays sharded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _chunked_pass(hidden, head, targets, token_weights, chunk_size, with_grads):
    """One pass over time chunks: (loss, nll [b, t]) and, with_grads, (d_hidden, d_head) of the
    loss (float32)."""
    b, t, d = hidden.shape
    q = max(1, min(t, chunk_size // b))
    pad = -t % q
    head32 = head.astype(jnp.float32)

    def to_chunks(x):  # [b, t, ...] -> [c, b, q, ...], zero-padded in time
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.swapaxes(x.reshape((b, -1, q) + x.shape[2:]), 0, 1)

    def step(carry, xs):
        loss, d_head = carry
        h, y, w = xs  # [b, q, d], [b, q], [b, q]
        # Flat [b q, ...] operands: XLA:CPU runs 3-D einsums of the same products up to 1.3x slower.
        h, y, w = h.reshape(-1, d), y.reshape(-1), w.reshape(-1)
        logits = h @ head32.T  # [b q, V]
        m = jnp.max(logits, axis=-1, keepdims=True)
        p = jnp.exp(logits - m)
        s = jnp.sum(p, axis=-1)
        target_logit = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
        nll = jnp.log(s) + m[:, 0] - target_logit
        loss = loss + jnp.sum(w * nll)
        if not with_grads:
            return (loss, d_head), nll.reshape(b, q)
        dlogits = p * (w / s)[:, None] - jax.nn.one_hot(y, head32.shape[0]) * w[:, None]
        d_head = d_head + dlogits.T @ h
        return (loss, d_head), (nll.reshape(b, q), (dlogits @ head32).reshape(b, q, d))

    xs = (to_chunks(hidden.astype(jnp.float32)), to_chunks(targets), to_chunks(token_weights))
    d_head0 = jnp.zeros(head.shape, jnp.float32) if with_grads else None
    (loss, d_head), out = jax.lax.scan(step, (jnp.zeros((), jnp.float32), d_head0), xs)

    def from_chunks(x):  # [c, b, q, ...] -> [b, t, ...]
        return jnp.swapaxes(x, 0, 1).reshape((b, -1) + x.shape[3:])[:, :t]

    if not with_grads:
        return loss, from_chunks(out)
    nll, d_hidden = out
    return loss, from_chunks(nll), from_chunks(d_hidden), d_head


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def linear_cross_entropy(hidden, head, targets, token_weights, chunk_size):
    """sum_bt token_weights * nll over time chunks; gradients computed in the forward pass."""
    return _chunked_pass(hidden, head, targets, token_weights, chunk_size, with_grads=False)[0]


def _chunked_fwd(hidden, head, targets, token_weights, chunk_size):
    loss, nll, d_hidden, d_head = _chunked_pass(hidden, head, targets, token_weights, chunk_size,
                                                with_grads=True)
    return loss, (nll, d_hidden.astype(hidden.dtype), d_head.astype(head.dtype))


def _chunked_bwd(chunk_size, residuals, g):
    del chunk_size
    nll, d_hidden, d_head = residuals
    return (g.astype(d_hidden.dtype) * d_hidden, g.astype(d_head.dtype) * d_head, None, g * nll)


linear_cross_entropy.defvjp(_chunked_fwd, _chunked_bwd)
