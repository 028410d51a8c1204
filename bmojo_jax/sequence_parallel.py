"""Sequence (context) parallelism: the model's forward with the time axis split over a mesh axis.

Notation: b batch, T time (whole sequence), n shards, L = T / n tokens per shard, i this shard,
w window (= chunk), cl = L / w chunks per shard, C = T / w chunks, h heads, e head_dim, m eidetic
slots, k tokens selected per chunk.

`sequence_parallel_forward(model, tokens, mesh, axis)` runs `model.forward(tokens, context=...)`
under `jax.shard_map`, shard i holding tokens [i L, (i + 1) L) of every sequence, and returns the
logits of the unsharded forward. There is one forward: the layers receive a `SequenceContext` (as
flash-linear-attention's chunked ops receive a context-parallel argument) and ask it for what
crosses a shard boundary; everything else is per token and needs no communication:

  * RoPE: global positions i L + [0, L) (`SequenceContext.offset`).
  * short causal conv (SSM): d_conv - 1 tokens of left context from the previous shard
    (`left`: `jax.lax.ppermute` to the right neighbour; zeros before position 0).
  * SSM recurrence: each shard scans from a zero state; the state entering shard i,
    H_i = sum_{j<i} (prod_{j<k<i} D_k) h_j, comes from the all-gathered (final state h_j, total
    decay D_j) of every shard (`carried_state`), and the SSM layer adds its contribution
    analytically (`layers.ssm`).
  * window keys (w back) and fading keys (2w back): the previous shards' last 2w keys/values
    (`left`, several hops when L < 2w) form a key prefix of `ops.memory_attention`, whose masks use
    global positions, so keys before position 0 are invisible.
  * full attention (`A`, in hybrid models): every shard's keys, all-gathered and rotated so that
    this shard's come last (`all_keys`; O(T) memory per device; a ring schedule would bound it,
    not implemented).
  * eidetic memory (`B`): the innovation score of a shard's first token reads the previous
    shard's last fading token (`left`). The scores are all-gathered ([b, T] floats) and every
    shard recomputes the whole selection (`ops.eidetic.Selection.select`: cheap integer
    bookkeeping; the scores agree with the unsharded ones to float rounding, so only a tie within
    rounding could break differently) and keeps its own chunks' rows (`eidetic_keys`). The
    keys/values of slots on earlier shards are fetched with `jax.lax.psum_scatter`: the slots that
    shard s can ever read from before its start are the memory of its first chunk plus the
    selections of the lag - 1 chunks before it (R = m + (lag - 1) k positions); every shard
    contributes the ones it owns, zeros elsewhere.
  * the innovation loss is averaged over the whole batch and sequence (`mean`).

Requirements (ValueError otherwise): T divisible by n; for window layers (W, F, B) the shard length
L a multiple of the window (the eidetic chunks must not straddle shards).

The attention runs the `xla` implementation of `ops.memory_attention` even when the model asks
for `pallas` (the kernels take no key prefix); results equal the unsharded forward to float32
rounding (tests: 1e-5).
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

@dataclasses.dataclass(frozen=True)
class SequenceContext:
    """What a layer needs to know and fetch when its input is one shard of the sequence; used
    inside `jax.shard_map` only (the collectives run over `axis`).

    Attributes:
      axis: the mesh axis that splits time.
      shards: n, its size.
      length: L, tokens per shard.
      reduce_axes: the mesh axes over which a mean over the whole batch and sequence is taken
        (`axis` and the batch axes).
    """

    axis: str
    shards: int
    length: int
    reduce_axes: tuple

    @property
    def index(self):
        """i, this shard (int32 scalar)."""
        return jax.lax.axis_index(self.axis)

    @property
    def offset(self):
        """Position of this shard's first token (int32 scalar)."""
        return self.index * self.length

    def mean(self, x):
        """The mean of per-shard means x over the whole batch and sequence."""
        return jax.lax.pmean(x, self.reduce_axes)

    def left(self, x, size: int):
        """The `size` tokens before this shard: x [b, L, ...] -> [b, size, ...], taken from the
        previous shards (several hops when size > L); zeros before position 0."""
        pieces, need, hop = [], size, 1
        while need > 0:
            take = min(self.length, need)
            tail = x[:, self.length - take:]
            if hop < self.shards:
                perm = [(j, j + hop) for j in range(self.shards - hop)]
                pieces.insert(0, jax.lax.ppermute(tail, self.axis, perm))
            else:
                pieces.insert(0, jnp.zeros_like(tail))
            need, hop = need - take, hop + 1
        return jnp.concatenate(pieces, axis=1) if pieces else x[:, :0]

    def all_keys(self, x):
        """Every shard's tokens, rotated so that this shard's come last: x [b, L, ...] ->
        [b, T, ...], entry j at position offset - (T - L) + j (the entries at negative positions
        are later shards' tokens: a causal mask hides them)."""
        gathered = jax.lax.all_gather(x, self.axis, axis=1, tiled=True)
        total = self.shards * self.length
        return jnp.roll(gathered, total - self.offset - self.length, axis=1)

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

    def eidetic_keys(self, selection, scores, k, v, x, *, before: int):
        """The eidetic slots of this shard's chunks and the keys/values they need from earlier
        shards. The selection runs on every shard over the whole sequence's scores (gathered:
        [b, T], small); the "state" rule (`selection.whole_state`), whose selection also reads
        the tokens, gathers them too ([b, T, d_model] on every shard: its selection is
        sequential over the whole sequence).

        Args:
          selection: the layer's `ops.eidetic.Selection`.
          scores: [b, L] this shard's innovation scores.
          k, v: [b, L, h, e] this shard's keys (RoPE applied) and values.
          x: [b, L, d_model] this shard's tokens (the layer's input; read by the "state" rule).
          before: P, the tokens of left context that the caller puts before this shard's keys.

        Returns:
          (memory [b, cl, m] int32, remote_k, remote_v [b, R', h, e], remote_scores [b, R'],
          scores [b, L]): the slots as indices into the keys [remote (R'); P tokens of left
          context; this shard's L], -1 = empty, the keys, values and scores of the remote
          entries (R' is R rounded up to a multiple of the window, so that the prefix stays
          chunk-aligned), and this shard's scores as the rule leaves them (the "state" rule's
          final ones, `select_whole_state`; the input otherwise).
        """
        w, per_chunk, lag = selection.window, selection.per_chunk, selection.lag
        b, t = scores.shape
        cl = t // w
        gathered = jax.lax.all_gather(jax.lax.stop_gradient(scores), self.axis, axis=1,
                                      tiled=True)
        if selection.whole_state:
            memory, gathered = selection.select_with_tokens(gathered, jax.lax.all_gather(
                jax.lax.stop_gradient(x), self.axis, axis=1, tiled=True))
            scores = jax.lax.dynamic_slice_in_dim(gathered, self.offset, t, axis=1)
        else:
            memory = selection.select(gathered)  # [b, C, m], global positions
        # every position a chunk may select (a superset where a threshold or quantile gate
        # drops some)
        candidates, _ = ops.chunk_topk(selection.gate(gathered), w, per_chunk)  # [b, C, k]
        rows = jax.lax.dynamic_slice_in_dim(memory, self.index * cl, cl, axis=1)  # [b, cl, m]

        # Positions before shard s that its rows can name: its first chunk's memory and the
        # selections of the lag - 1 chunks before it, still pending then.
        def incoming(s):
            first = s * cl
            pending = [candidates[:, chunk] if chunk >= 0 else
                       jnp.full((b, per_chunk), -1, jnp.int32)
                       for chunk in range(first - lag + 1, first)]
            return jnp.concatenate([memory[:, first]] + pending, axis=1)  # [b, R]

        wanted = jnp.stack([incoming(s) for s in range(self.shards)])  # [n, b, R]
        owned = (wanted >= self.offset) & (wanted < self.offset + t)
        local = jnp.clip(wanted - self.offset, 0, t - 1)
        take = jax.vmap(jax.vmap(lambda xb, pb: xb[pb]), in_axes=(None, 0))  # [n, b, R, ...]
        mask = owned[..., None, None]
        remote_k, remote_v, remote_scores = (
            jax.lax.psum_scatter(jnp.where(mask if x.ndim == 4 else owned, take(x, local), 0),
                                 self.axis) for x in (k, v, scores.astype(jnp.float32)))
        mine = wanted[self.index]  # [b, R]
        pad = -mine.shape[1] % w
        remote_k, remote_v, remote_scores = (
            jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
            for a in (remote_k, remote_v, remote_scores))

        # Each slot's index into [remote (R + pad) | left context (P) | this shard (L)].
        remote = jnp.argmax(rows[..., None] == mine[:, None, None, :], axis=-1)
        here = mine.shape[1] + pad + before + rows - self.offset
        index = jnp.where(rows >= self.offset, here, remote)
        return (jnp.where(rows >= 0, index, -1).astype(jnp.int32), remote_k, remote_v,
                remote_scores, scores)


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


def _run_sharded(model, arrays, mesh: Mesh, axis: str, batch_axis, body, out_specs):
    """Runs body(model, context, *arrays) under `jax.shard_map`, every array [b, T] split as
    (batch_axis, axis), the model's state replicated."""
    if axis not in mesh.shape:
        raise ValueError(f"axis {axis!r} is not a mesh axis ({', '.join(mesh.axis_names)}).")
    shards = mesh.shape[axis]
    if arrays[0].ndim != 2:
        raise ValueError(f"tokens must be [batch, time]; got shape {arrays[0].shape}.")
    length = check_sequence_parallel(model, arrays[0].shape[1], shards)
    batch_axes = () if batch_axis is None else (
        (batch_axis,) if isinstance(batch_axis, str) else tuple(batch_axis))
    context = SequenceContext(axis, shards, length, (axis,) + batch_axes)
    graphdef, state = nnx.split(model)
    data_spec = P(batch_axis, axis)
    # check_vma=False: the ops start their scans from constant (unvarying) carries; without the
    # check the numbers, and the gradients, are the same (JAX JEP 17111), only less annotated.
    fn = jax.shard_map(lambda state, *xs: body(nnx.merge(graphdef, state), context, *xs),
                       mesh=mesh, in_specs=(P(),) + (data_spec,) * len(arrays),
                       out_specs=out_specs, check_vma=False)
    # Placed (or, under jit, constrained) as shard_map expects, also on meshes with Explicit axes.
    state = jax.device_put(state, NamedSharding(mesh, P()))
    arrays = [jax.device_put(x, NamedSharding(mesh, data_spec)) for x in arrays]
    return fn(state, *arrays)


def sequence_parallel_forward(model, tokens, mesh: Mesh, axis: str, *,
                              batch_axis: Optional[str | tuple] = None, with_aux: bool = False,
                              eidetic_scores=None):
    """`model.forward` with the time axis split over `axis` of `mesh` (see module docstring).

    Args:
      model: a `LanguageModel`.
      tokens: int [b, T]; T divisible by mesh.shape[axis], and T / shards a multiple of every
        window layer's window.
      mesh: a `jax.sharding.Mesh`; axes other than `axis` and `batch_axis` see replicated work.
      axis: the mesh axis (name) that splits time.
      batch_axis: optional mesh axis (or tuple of axes) that splits the batch rows.
      with_aux: also return the auxiliary (innovation) loss, as `model.forward` does.
      eidetic_scores: optional float [b, T] oracle scores, as in `model.forward`.

    Returns:
      logits [b, T, vocab_size] float32 sharded as (batch_axis, axis, None); with `with_aux`,
      (logits, aux_loss float32 scalar). Differentiable (the collectives have transposes).

    Raises:
      ValueError: an unknown axis, or a split that `check_sequence_parallel` rejects.
    """
    def body(model, context, tokens, *scores):
        return model.forward(tokens, context=context, eidetic_scores=scores[0] if scores else None)

    arrays = [tokens] if eidetic_scores is None else [tokens, eidetic_scores]
    logits, aux = _run_sharded(model, arrays, mesh, axis, batch_axis, body,
                               out_specs=(P(batch_axis, axis, None), P()))
    return (logits, aux) if with_aux else logits


def sequence_parallel_cross_entropy(model, tokens, targets, mesh: Mesh, axis: str, *,
                                    batch_axis: Optional[str | tuple] = None,
                                    eidetic_scores=None):
    """`model.cross_entropy(tokens, targets)` with the time axis split over `axis` of `mesh`:
    how training runs a context too long for one device (`sharding.SEQUENCE_AXIS`).

    Args:
      model, tokens, mesh, axis, batch_axis: as in `sequence_parallel_forward`.
      targets: int [b, T] next-token ids, negative where unlabelled.
      eidetic_scores: optional float [b, T] oracle scores, as in `model.forward`.

    Returns:
      (ce, labelled, aux_loss) as `LanguageModel.cross_entropy`: the mean NLL over all labelled
      targets of the whole batch (float32 nats), their count (int32), the auxiliary loss.
      Differentiable.

    Raises:
      ValueError: as `sequence_parallel_forward`, or targets of another shape than tokens.
    """
    if targets.shape != tokens.shape:
        raise ValueError(f"targets {targets.shape} must have the shape of tokens {tokens.shape}.")

    def body(model, context, tokens, targets, *scores):
        ce, labelled, aux = model.cross_entropy(tokens, targets, context=context,
                                                eidetic_scores=scores[0] if scores else None)
        count = jax.lax.psum(labelled, context.reduce_axes)
        total = jax.lax.psum(ce * labelled, context.reduce_axes)
        return total / jnp.maximum(count, 1), count, aux

    arrays = [tokens, targets] + ([] if eidetic_scores is None else [eidetic_scores])
    return _run_sharded(model, arrays, mesh, axis, batch_axis, body, out_specs=(P(), P(), P()))


__all__ = ["SequenceContext", "sequence_parallel_forward", "sequence_parallel_cross_entropy",
           "check_sequence_parallel"]
