"""Sequence (context) parallelism: the model's forward with the time axis split over a mesh axis.

Notation: b batch, T time (whole sequence), n shards, L = T / n tokens per shard, i this shard,
w window (= chunk), cl = L / w chunks per shard, C = T / w chunks, h heads, e head_dim, m eidetic
slots, k_e tokens selected per chunk.

`sequence_parallel_forward(model, tokens, mesh, axis)` runs `model(tokens)` under `jax.shard_map`
with shard i holding tokens [i L, (i + 1) L) of every sequence, and returns the same logits. It
reuses the layers' own projections and the ops; only what crosses a shard boundary is new:

  * embeddings, norms, MLPs, Q/K/V projections: per token, no communication. RoPE uses the global
    positions i L + [0, L).
  * short causal conv (SSM): its d_conv - 1 tokens of left context come from the previous shard
    (`jax.lax.ppermute` to the right neighbour; zeros on shard 0, which is the conv's own padding).
  * SSM recurrence (Mamba-2 `ssd` and Mamba-1 `selective_scan`): each shard scans from a zero
    state (`h0=None`), giving its output y0 and final state h_i. With the shard's total decay
    D_i = exp(a * sum_t dt_t) (per head for Mamba-2, per (channel, state) for Mamba-1), the state
    entering shard i is H_i = sum_{j<i} (prod_{j<k<i} D_k) h_j, computed from the all-gathered
    (h_j, D_j) (`jax.lax.all_gather`; n small states). Our choice: the correction is analytical,
    not a second scan: the true state at local step t is h0_t + exp(a * cumsum(dt)_t) H_i, so
    y_t = y0_t + C_t . (exp(a * cumsum(dt)_t) H_i), which passes through the gate and out_proj
    linearly (one extra einsum; for Mamba-1 it runs over chunks of `chunk_size` to bound memory).
  * window keys (w tokens back) and fading keys (2w back): the previous shard's last w / 2w
    keys/values are exchanged with `ppermute` (several hops when L < 2w); the attention of a query
    chunk then reads the same blocks as the unsharded block-sparse op, with masks on global
    positions, so keys before position 0 are invisible.
  * eidetic memory (`B`): the innovation score of a shard's first token needs the previous shard's
    last fading token (`ppermute`). The scores are all-gathered ([b, T] floats) and every shard
    recomputes the whole selection with `ops.select_eidetic` (cheap integer bookkeeping; the
    unsharded selection given the same scores, and the scores agree to float rounding, so only a
    tie within rounding could break differently) and keeps its own chunks' rows. The keys/values
    of slots on earlier shards are fetched with `jax.lax.psum_scatter`: the slots that shard s
    can ever read from before its start are the memory of its first chunk plus the selections of
    the lag - 1 chunks before it (R = m + (lag - 1) k_e positions); every shard contributes the
    ones it owns, zeros elsewhere.
  * full attention (`A`, in hybrid models): keys/values are all-gathered (O(T) memory per device;
    a ring schedule would bound it, not implemented).

Requirements (ValueError otherwise): T divisible by n; for window layers (W, F, B) the shard length
L a multiple of the window (the eidetic chunks must not straddle shards).

The attention here is a dense-per-chunk XLA softmax (the `xla` layout), whatever the model's
`implementation`; results equal the unsharded forward to float32 rounding (tests: 1e-5).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bmojo_jax import ops
from bmojo_jax.layers import SSM, MemoryAttention

_MASKED = -1e30


@dataclasses.dataclass(frozen=True)
class _Shard:
    """Inside `shard_map`: this shard's place along the sequence axis."""

    axis: str
    n: int  # shards
    length: int  # L, tokens per shard
    reduce_axes: tuple  # axes over which a mean over the whole batch and sequence is taken

    @property
    def index(self):
        return jax.lax.axis_index(self.axis)

    @property
    def offset(self):
        return self.index * self.length

    def positions(self):
        return self.offset + jnp.arange(self.length)

    def left_halo(self, x, size: int):
        """The `size` tokens before this shard: x [b, L, ...] -> [b, size, ...], taken from the
        previous shards (several hops when size > L); zeros before position 0."""
        pieces, need, hop = [], size, 1
        while need > 0:
            take = min(self.length, need)
            tail = x[:, self.length - take:]
            if hop < self.n:
                perm = [(j, j + hop) for j in range(self.n - hop)]
                pieces.insert(0, jax.lax.ppermute(tail, self.axis, perm))
            else:
                pieces.insert(0, jnp.zeros_like(tail))
            need, hop = need - take, hop + 1
        return jnp.concatenate(pieces, axis=1)

    def carried_state(self, h_last, decay):
        """State entering this shard from every shard's zero-start final state h_last and total
        decay (broadcastable to h_last): H_i = D_{i-1} H_{i-1} + h_{i-1}, H_0 = 0."""
        hs = jax.lax.all_gather(h_last, self.axis)
        ds = jax.lax.all_gather(decay, self.axis)

        def step(state, inputs):
            h, d = inputs
            return d * state + h, state

        _, entering = jax.lax.scan(step, jnp.zeros_like(h_last), (hs, ds))
        return entering[self.index]


# --------------------------------------------------------------------------------------------------
# SSM
# --------------------------------------------------------------------------------------------------


def _causal_conv(ssm: SSM, x):
    """The SSM's causal depthwise conv on x [b, t, channels] (as the layer computes it)."""
    conv = getattr(ssm, "_causal_conv", None)
    return conv(x) if conv is not None else ssm.conv(x)


def _ssm_forward(ssm: SSM, x, shard: _Shard):
    """The selective-SSM mixer on this shard, with the state carried across shards.
    x [b, L, d_model] -> [b, L, d_model]."""
    z, xbc, dt = jnp.split(ssm.in_proj(x), ssm.splits, axis=-1)
    width = ssm.conv.kernel.shape[0] - 1
    if width:
        left = shard.left_halo(xbc, width)
        xbc = jax.nn.silu(_causal_conv(ssm, jnp.concatenate([left, xbc], axis=1))[:, width:])
    else:
        xbc = jax.nn.silu(_causal_conv(ssm, xbc))
    y, h_last = ssm._mix(z, xbc, dt, None, ssm.implementation)  # from a zero state

    # Total decay of the shard and the decay from its start to each token (log space: a * cumsum).
    b, t, _ = xbc.shape
    _, _, C, dt, a = ssm.dynamics(xbc, dt)
    cum = jnp.cumsum(dt, axis=1)  # [b, L, h] (mamba2) or [b, L, inner] (mamba1)
    C = C.astype(jnp.float32)
    if ssm.kind == "mamba2":
        decay = jnp.exp(cum[:, -1] * a)[:, :, None, None]  # [b, h, 1, 1]
        entering = shard.carried_state(h_last, decay)  # [b, h, p, n]
        correction = jnp.einsum("btn,bhpn,bth->bthp", C, entering, jnp.exp(cum * a))
        correction = correction.reshape(b, t, ssm.inner)
    else:
        decay = jnp.exp(cum[:, -1, :, None] * a)  # [b, inner, n]
        entering = shard.carried_state(h_last, decay)
        correction = _mamba1_correction(C, cum, a, entering, ssm.chunk_size)
    gated = correction * jax.nn.silu(z.astype(jnp.float32))
    return (y + ssm.out_proj(gated.astype(z.dtype))).astype(x.dtype)


def _mamba1_correction(C, cum, a, entering, chunk: int):
    """y_t[d] = sum_n C_t[n] exp(cum_t[d] a[d, n]) H[d, n] over chunks of time (memory
    [b, chunk, d, n] at a time). C [b, L, n], cum [b, L, d], a [d, n], H [b, d, n] -> [b, L, d]."""
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


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------


def _attend(q, groups):
    """One softmax over key groups. q [b, c, s, h, e] (RoPE'd); each group (keys, values
    [b', c, K, h, e], mask broadcastable to [b, c, s, K]) -> [b, c, s, h, e] float32."""
    b, c, s, h, e = q.shape
    q = q.astype(jnp.float32) * e ** -0.5
    logits = jnp.concatenate([jnp.einsum("bcqhe,bckhe->bhcqk", q, keys.astype(jnp.float32))
                              for keys, _, _ in groups], axis=-1)
    mask = jnp.concatenate([jnp.broadcast_to(m, (b, c, s, keys.shape[2]))
                            for keys, _, m in groups], axis=-1)
    probs = jax.nn.softmax(jnp.where(mask[:, None], logits, _MASKED), axis=-1)
    values = jnp.concatenate([vals.astype(jnp.float32) for _, vals, _ in groups], axis=2)
    return jnp.einsum("bhcqk,bckhe->bcqhe", probs, values)


def _band(keys, values, shard: _Shard, window: int, lo: int, hi: int):
    """Key group of the keys at distance lo <= i - j < hi = lo + w from each query. As in the
    block-sparse op, query chunk c reads the key chunks c - hi/w and c - hi/w + 1: the hi tokens
    before the shard are fetched (`left_halo`), and chunk c reads chunks c, c + 1 of the extended
    keys. keys, values [b, L, h, e] -> ([b, c, 2w, h, e] twice, mask [1, c, w, 2w])."""
    if hi - lo != window or lo % window:
        raise ValueError(f"band [{lo}, {hi}) must be one chunk of {window} tokens.")
    b, t = keys.shape[:2]
    c = t // window

    def extend(x):
        x = jnp.concatenate([shard.left_halo(x, hi), x], axis=1)[:, : (c + 1) * window]
        x = x.reshape((b, c + 1, window) + x.shape[2:])
        return jnp.concatenate([x[:, :-1], x[:, 1:]], axis=2)

    k_pos = shard.offset - hi + jnp.arange((c + 1) * window).reshape(c + 1, window)
    k_pos = jnp.concatenate([k_pos[:-1], k_pos[1:]], axis=1)  # [c, 2w]
    q_pos = shard.positions().reshape(c, window)
    dist = q_pos[:, :, None] - k_pos[:, None, :]  # [c, w, 2w]
    mask = (dist >= lo) & (dist < hi) & (k_pos >= 0)[:, None, :]
    return extend(keys), extend(values), mask[None]


def _eidetic(layer: MemoryAttention, shard: _Shard, x, f, k, v):
    """The eidetic key group and the layer's (weighted) innovation loss on this shard."""
    sel = layer.select
    w, per_chunk, lag = sel["window"], sel["per_chunk"], sel["lag"]
    b, t = x.shape[:2]
    cl = t // w
    previous_f = jnp.concatenate([shard.left_halo(f, 1), f[:, :-1]], axis=1)
    error = layer._innovation(x, previous_f)  # [b, L]
    loss = layer.loss_weight * jax.lax.pmean(jnp.mean(error), shard.reduce_axes)

    scores = jax.lax.all_gather(jax.lax.stop_gradient(error), shard.axis, axis=1, tiled=True)
    memory = ops.select_eidetic(scores, **sel)  # [b, C, m], global positions
    candidates, _ = ops.chunk_topk(scores, w, per_chunk)  # [b, C, k_e]
    rows = jax.lax.dynamic_slice_in_dim(memory, shard.index * cl, cl, axis=1)  # [b, cl, m]

    # Positions before shard s that its rows can name: its first chunk's memory and the
    # selections of the lag - 1 chunks before it, still pending then.
    def incoming(s):
        first = s * cl
        pending = [candidates[:, chunk] if chunk >= 0 else jnp.full((b, per_chunk), -1, jnp.int32)
                   for chunk in range(first - lag + 1, first)]
        return jnp.concatenate([memory[:, first]] + pending, axis=1)  # [b, R]

    wanted = jnp.stack([incoming(s) for s in range(shard.n)])  # [n, b, R]
    owned = (wanted >= shard.offset) & (wanted < shard.offset + t)
    local = jnp.clip(wanted - shard.offset, 0, t - 1)
    take = jax.vmap(jax.vmap(lambda xb, pb: xb[pb]), in_axes=(None, 0))  # [n, b, R, ...]
    mask = owned[..., None, None]
    received_k = jax.lax.psum_scatter(jnp.where(mask, take(k, local), 0), shard.axis)
    received_v = jax.lax.psum_scatter(jnp.where(mask, take(v, local), 0), shard.axis)
    mine = wanted[shard.index]  # [b, R]

    # Each slot's index into [received (R) | this shard's tokens (L)].
    remote = jnp.argmax(rows[..., None] == mine[:, None, None, :], axis=-1)
    index = jnp.where(rows >= shard.offset, mine.shape[1] + rows - shard.offset, remote)
    gather = jax.vmap(lambda xb, pb: xb[pb])
    slot_k = gather(jnp.concatenate([received_k, k], axis=1), index)  # [b, cl, m, h, e]
    slot_v = gather(jnp.concatenate([received_v, v], axis=1), index)
    return (slot_k, slot_v, (rows >= 0)[:, :, None, :]), loss


def _attention_forward(layer: MemoryAttention, x, shard: _Shard):
    """The attention mixer (A W F B) on this shard. x [b, L, d_model] -> ([b, L, d_model],
    the innovation loss or 0)."""
    b, t, d = x.shape
    positions = shard.positions()
    q, k, v = layer._qkv(x, positions)
    h, e = q.shape[2:]
    loss = jnp.zeros((), jnp.float32)
    if layer.window is None:  # full causal attention: every earlier key, gathered
        keys = jax.lax.all_gather(k, shard.axis, axis=1, tiled=True)
        values = jax.lax.all_gather(v, shard.axis, axis=1, tiled=True)
        mask = jnp.arange(keys.shape[1])[None, :] <= positions[:, None]
        y = _attend(q[:, None], [(keys[:, None], values[:, None], mask[None, None])])
    else:
        w = layer.window
        groups = [_band(k, v, shard, w, 0, w)]
        if layer.fading is not None:
            f = _ssm_forward(layer.fading, x, shard)
            kf, vf = layer._fading_kv(f, positions)
            groups.append(_band(kf, vf, shard, w, w, 2 * w))
            if layer.eidetic:
                group, loss = _eidetic(layer, shard, x, f, k, v)
                groups.append(group)
        y = _attend(q.reshape(b, t // w, w, h, e), groups)
    return layer.wo(y.reshape(b, t, d).astype(x.dtype)), loss


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


def check_sequence_parallel(model, seq_len: int, shards: int) -> int:
    """Validates a sequence-parallel split; returns the shard length L.

    Raises:
      ValueError: seq_len not divisible by the shards, or a window layer whose window does not
        divide L (the message names the layer and both numbers).
    """
    if seq_len % shards:
        raise ValueError(f"sequence length {seq_len} is not divisible by the {shards} shards of "
                         f"the sequence axis.")
    length = seq_len // shards
    for i, block in enumerate(model.blocks):
        window = getattr(block.mixer, "window", None)
        if window is not None and length % window:
            raise ValueError(f"shard length {length} (= {seq_len} tokens / {shards} shards) is not "
                             f"a multiple of the window (chunk) {window} of layer {i} "
                             f"({model.config.layer_mixers[i]}); choose a sequence length that is "
                             f"a multiple of {shards * window}.")
    return length


def sequence_parallel_forward(model, tokens, mesh: Mesh, axis: str, *,
                              batch_axis: Optional[str | tuple] = None, with_aux: bool = False):
    """`model.forward` with the time axis split over `axis` of `mesh` (see module docstring).

    Args:
      model: a `LanguageModel`.
      tokens: int [b, T]; T divisible by mesh.shape[axis], and T / shards a multiple of every
        window layer's window.
      mesh: a `jax.sharding.Mesh`; axes other than `axis` and `batch_axis` see replicated work.
      axis: the mesh axis (name) that splits time.
      batch_axis: optional mesh axis (or tuple of axes) that splits the batch rows.
      with_aux: also return the auxiliary (innovation) loss, as `model.forward` does.

    Returns:
      logits [b, T, vocab_size] float32 sharded as (batch_axis, axis, None); with `with_aux`,
      (logits, aux_loss float32 scalar). Differentiable (the collectives have transposes).

    Raises:
      ValueError: an unknown axis, or a split that `check_sequence_parallel` rejects.
    """
    if axis not in mesh.shape:
        raise ValueError(f"axis {axis!r} is not a mesh axis ({', '.join(mesh.axis_names)}).")
    shards = mesh.shape[axis]
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, time]; got shape {tokens.shape}.")
    length = check_sequence_parallel(model, tokens.shape[1], shards)
    batch_axes = () if batch_axis is None else (
        (batch_axis,) if isinstance(batch_axis, str) else tuple(batch_axis))
    shard = _Shard(axis, shards, length, (axis,) + batch_axes)
    graphdef, state = nnx.split(model)

    def body(state, tokens):
        model = nnx.merge(graphdef, state)
        x = model.embed(tokens)
        aux = jnp.zeros((), jnp.float32)
        for block in model.blocks:
            normed = block.mixer_norm(x)
            if isinstance(block.mixer, SSM):
                y = _ssm_forward(block.mixer, normed, shard)
            else:
                y, loss = _attention_forward(block.mixer, normed, shard)
                aux = aux + loss
            x = x + y
            x = x + block.mlp(block.mlp_norm(x))
        return model._head(x), aux

    data_spec = P(batch_axis, axis)
    # check_vma=False: the ops start their scans from constant (unvarying) carries; without the
    # check the numbers, and the gradients, are the same (JAX JEP 17111), only less annotated.
    fn = jax.shard_map(body, mesh=mesh, in_specs=(P(), data_spec),
                       out_specs=(P(batch_axis, axis, None), P()), check_vma=False)
    # Placed (or, under jit, constrained) as shard_map expects, also on meshes with Explicit axes.
    state = jax.device_put(state, NamedSharding(mesh, P()))
    tokens = jax.device_put(tokens, NamedSharding(mesh, data_spec))
    logits, aux = fn(state, tokens)
    return (logits, aux) if with_aux else logits


__all__ = ["sequence_parallel_forward", "check_sequence_parallel"]
