"""The language model: embeddings, pre-norm decoder blocks, final norm, LM head (docs/design.md
section 3).

    block(x) = x + mixer(RMSNorm(x));  x + SwiGLU(RMSNorm(x))

The mixer of each layer is picked by `ModelConfig.layer_mixers`: `M` is the selective SSM, the
letters A W F B are the attention mixer with growing memory (see `layers.attention`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from bmojo_jax import array_typing as at
from bmojo_jax import ops
from bmojo_jax.config import ModelConfig
from bmojo_jax.layers import SSM, MemoryAttention, SwiGLU
from bmojo_jax.layers.attention import EideticTrace

# `ModelConfig.remat` -> the `jax.checkpoint` policy of each block (None: save nothing but the
# block's inputs). "dots" keeps the outputs of matmuls without batch dimensions (the weight
# matmuls: projections, MLP), so the backward recomputes the elementwise ops, attention and scans.
REMAT_POLICIES = {"block": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


@struct.dataclass
class Cache:
    """A `LanguageModel`'s decoding cache (see `LanguageModel.init_cache`).

    position: int32 scalar, tokens consumed so far.
    layers: one streaming state per layer: `layers.SSMState` (`M`) or `layers.AttentionState`.
    """

    position: jax.Array
    layers: tuple


class Block(nnx.Module):
    """Pre-norm decoder block. [b, t, d_model] -> [b, t, d_model]: x + mixer(norm(x)), then
    x + mlp(norm(x)) unless `d_ff` = 0 (the mixer alone, as Mamba's blocks).

    With a dropout key (training), `residual_dropout` drops the mixer's and the MLP's outputs
    before each residual add and the attention mixer applies `attention_dropout`; `remat`
    rematerialises the block in the backward pass (`REMAT_POLICIES`).
    """

    def __init__(self, config: ModelConfig, letter: str, *, rngs: nnx.Rngs):
        d, dtype = config.d_model, jnp.dtype(config.dtype)
        self.mixer_norm = nnx.RMSNorm(d, dtype=dtype, rngs=rngs)
        if letter == "M":
            self.mixer = SSM(d, expand=config.ssm_expand, d_state=config.d_state,
                             kind=config.ssm_kind, head_dim=config.ssm_head_dim,
                             d_conv=config.d_conv, chunk_size=config.chunk_size,
                             implementation=config.scan_implementation or config.implementation,
                             dtype=dtype, rngs=rngs)
        else:
            self.mixer = MemoryAttention(config, letter, rngs=rngs)
        if config.hidden_dim:
            self.mlp_norm = nnx.RMSNorm(d, dtype=dtype, rngs=rngs)
            self.mlp = SwiGLU(d, config.hidden_dim, dtype=dtype, rngs=rngs)
        else:
            self.mlp = None
        self.dropout = nnx.Dropout(config.residual_dropout)
        self.remat = config.remat

    def __call__(self, x):
        return self.prefill(x)[0]

    def _attention_args(self, **kwargs) -> dict:
        """`kwargs` (oracle scores, dropout key) for an attention mixer; SSM mixers take none."""
        return {} if isinstance(self.mixer, SSM) else kwargs

    def prefill(self, x, max_length=None, context=None, eidetic_scores=None, dropout_key=None,
                segment_ids=None):
        """x [b, t, d_model] -> (output [b, t, d_model], the mixer's streaming state); `context`:
        a `SequenceContext` when x is one shard of a longer sequence; `eidetic_scores` [b, t] and
        `segment_ids` [b, t]: see `LanguageModel.forward`; `dropout_key`: a PRNG key (training:
        dropout on) or None (deterministic). Rematerialised as `remat` says."""
        if self.remat == "none":
            return self._prefill(x, max_length, context, eidetic_scores, dropout_key, segment_ids)
        run = nnx.remat(lambda block, x, scores, key, ids: block._prefill(
            x, max_length, context, scores, key, ids), policy=REMAT_POLICIES[self.remat])
        return run(self, x, eidetic_scores, dropout_key, segment_ids)

    def _prefill(self, x, max_length, context, eidetic_scores, dropout_key, segment_ids):
        keys = [None] * 3 if dropout_key is None else list(jax.random.split(dropout_key, 3))
        y, state = self.mixer.prefill(self.mixer_norm(x), max_length, context=context,
                                      segment_ids=segment_ids,
                                      **self._attention_args(eidetic_scores=eidetic_scores,
                                                             dropout_key=keys[2]))
        x = x + self.dropout(y, deterministic=dropout_key is None, rngs=keys[0])
        if self.mlp is None:
            return x, state
        y = self.mlp(self.mlp_norm(x))
        return x + self.dropout(y, deterministic=dropout_key is None, rngs=keys[1]), state

    def step(self, x, state, position, eidetic_scores=None):
        """One token x [b, d_model] at `position` -> (output [b, d_model], next mixer state);
        deterministic (no dropout)."""
        y, state = self.mixer.step(self.mixer_norm(x), state, position,
                                   **self._attention_args(eidetic_scores=eidetic_scores))
        x = x + y
        return (x if self.mlp is None else x + self.mlp(self.mlp_norm(x))), state


class LanguageModel(nnx.Module):
    """Decoder-only LM of the B'MOJO family.

    `model(tokens)` maps int32 tokens [batch, time] (any time >= 1) to float32 logits
    [batch, time, vocab_size]; `model.forward(tokens)` also returns the auxiliary loss that
    training adds (B'MOJO's innovation-predictor loss, sown by its layers). Training hands
    `forward` / `cross_entropy` a `dropout_key` (dropout on, `ModelConfig` *_dropout); every other
    path is deterministic. The LM head runs in float32 whatever `config.dtype`.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = jnp.dtype(config.dtype)
        self.embed = nnx.Embed(config.vocab_size, config.d_model, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(config.embedding_dropout)
        self.blocks = nnx.List([Block(config, letter, rngs=rngs)
                                for letter in config.layer_mixers])
        self.norm = nnx.RMSNorm(config.d_model, dtype=dtype, rngs=rngs)
        self.head = None if config.tie_embeddings else nnx.Linear(
            config.d_model, config.vocab_size, use_bias=False, rngs=rngs)  # used via _head_weights

    def __call__(self, tokens: at.Tokens, *, eidetic_scores: at.Scores | None = None,
                 segment_ids: at.SegmentIds | None = None) -> at.Logits:
        """tokens: int [batch, time] in [0, vocab_size) -> float32 logits [batch, time, vocab_size].
        `eidetic_scores`, `segment_ids`: see `forward`.

        Raises:
          ValueError: tokens not 2-D integers, or (when concrete) ids out of range; bad
            segment_ids.
        """
        return self.forward(tokens, eidetic_scores=eidetic_scores, segment_ids=segment_ids)[0]

    def forward(self, tokens: at.Tokens, *, eidetic_scores: at.Scores | None = None,
                context=None, dropout_key: jax.Array | None = None,
                segment_ids: at.SegmentIds | None = None) -> tuple[at.Logits, at.Scalar]:
        """Logits [batch, time, vocab_size] float32 and the auxiliary loss (float32 scalar: the sum
        of the already-weighted `innovation_loss`es sown by B'MOJO layers; 0 without them).

        Args:
          tokens: int [batch, time] in [0, vocab_size).
          eidetic_scores: optional float [batch, time] scores that replace the selection rule's
            scores in every `B` layer (an oracle: e.g. 1 where a token is worth keeping, 0
            elsewhere; -inf = never kept). The top `eidetic_per_chunk` of each chunk are kept, as
            with the rule's own scores.
          context: a `sequence_parallel.SequenceContext` when `tokens` is one shard of a longer
            sequence, inside `jax.shard_map` (`sequence_parallel.sequence_parallel_forward` does
            this); None otherwise.
          dropout_key: a PRNG key: training mode, the `ModelConfig` dropout rates apply (the masks
            are a function of the key; under `context`, of the key and the shard). None
            (default): deterministic.
          segment_ids: optional int [batch, time], packed documents: the document of every token
            (a document is a run of equal ids). Every memory restarts at a document (window,
            fading keys and SSM, conv, eidetic slots; `layers.attention`), so each document's
            logits are those it gets alone (up to float rounding: RoPE sits at the packed
            positions; for `B` layers exactly so when documents start at multiples of the
            window). Not with `context`, nor with the "state", "threshold" and "quantile" rules.
        """
        (logits, _), sown, _ = nnx.capture(self._prefill, nnx.Intermediate, EideticTrace)(
            tokens, None, context, eidetic_scores, dropout_key, segment_ids)
        return logits, _aux_loss(sown)

    def eidetic_trace(self, tokens: at.Tokens, *, eidetic_scores: at.Scores | None = None,
                      segment_ids: at.SegmentIds | None = None
                      ) -> dict[int, dict[str, jax.Array]]:
        """What every `B` layer's eidetic memory and store did on `tokens` (a plain parallel
        forward): {layer index: {"scores" [b, t], "memory_positions" [b, c, m] int32 (with eidetic
        slots), "storage_positions" [b, c, r] int32 (with a store), "attention_mass" [b, t, 3]
        (window, fading, eidetic)}} for every `B` layer with slots or a store (see
        `layers.attention.EideticTrace`; the input of `bmojo_jax.diagnostics`). Arguments as in
        `forward`."""
        _, _, trace = nnx.capture(self._prefill, nnx.Intermediate, EideticTrace)(
            tokens, None, None, eidetic_scores, None, segment_ids)
        blocks = trace["blocks"] if "blocks" in trace else {}
        return {int(i): {name: variable.get_value()[0]
                         for name, variable in block["mixer"].items()}
                for i, block in blocks.items()}

    def cross_entropy(self, tokens: at.Tokens, targets: at.Tokens, *,
                      eidetic_scores: at.Scores | None = None, context=None,
                      dropout_key: jax.Array | None = None,
                      segment_ids: at.SegmentIds | None = None
                      ) -> tuple[at.Scalar, at.IntScalar, at.Scalar]:
        """The training objective's terms without materialising the logits
        (`ops.linear_cross_entropy`: the `xla` implementation unless config.implementation is
        "reference"; our choice, for speed and memory). The head is computed in float32, as in
        `forward`.

        Args:
          tokens: int [batch, time] inputs, ids in [0, vocab_size).
          targets: int [batch, time] next-token ids in [0, vocab_size), or negative (e.g.
            `data.IGNORE_INDEX` = -100) where unlabelled.
          eidetic_scores: as in `forward`.
          context: as in `forward` (the returned mean and count are then this shard's).
          dropout_key: as in `forward` (training: dropout on; None: deterministic).
          segment_ids: as in `forward` (packed documents; a document's last target, the next
            document's first token, should be unlabelled: `data.pack_documents` does that).

        Returns:
          (ce, labelled, aux_loss): mean NLL over labelled targets (float32 nats; 0 if none), their
          count (int32), and the auxiliary loss as in `forward`.

        Raises:
          ValueError: bad tokens, targets of another shape, or (when concrete) target ids >=
            vocab_size.
        """
        _require_array(tokens, "token")  # the full check runs in _trunk
        check_tokens(targets, self.config.vocab_size, name="target", unlabelled_ok=True)
        if targets.shape != tokens.shape:
            raise ValueError(f"targets {targets.shape} must have the shape of tokens "
                             f"{tokens.shape}.")
        (x, _), sown, _ = nnx.capture(self._trunk, nnx.Intermediate, EideticTrace)(
            tokens, None, context, eidetic_scores, dropout_key, segment_ids)
        mask = targets >= 0
        labelled = mask.sum(dtype=jnp.int32)
        weights = mask.astype(jnp.float32) / jnp.maximum(labelled, 1)
        ce = ops.linear_cross_entropy(
            self.norm(x), self._head_weights(), jnp.where(mask, targets, 0), weights,
            implementation="reference" if self.config.implementation == "reference" else "xla")
        return ce, labelled, _aux_loss(sown)

    def _trunk(self, tokens, max_length, context, eidetic_scores, dropout_key=None,
               segment_ids=None):
        """Embedding and blocks: (features [b, t, d_model] before the final norm, layer states);
        dropout with a `dropout_key` (see `forward`)."""
        check_tokens(tokens, self.config.vocab_size)
        _check_scores(eidetic_scores, tokens.shape)
        _check_segment_ids(segment_ids, tokens.shape, context)
        keys = [None] * (len(self.blocks) + 1)
        if dropout_key is not None:
            if context is not None:  # independent masks on every shard
                dropout_key = jax.random.fold_in(dropout_key, context.index)
            keys = list(jax.random.split(dropout_key, len(keys)))
        x = self.dropout(self.embed(tokens), deterministic=dropout_key is None, rngs=keys[0])
        states = []
        for block, key in zip(self.blocks, keys[1:]):
            x, state = block.prefill(x, max_length, context, eidetic_scores, key, segment_ids)
            states.append(state)
        return x, tuple(states)

    def _prefill(self, tokens, max_length, context, eidetic_scores, dropout_key=None,
                 segment_ids=None):
        x, states = self._trunk(tokens, max_length, context, eidetic_scores, dropout_key,
                                segment_ids)
        return self._head(x), states

    def _head_weights(self) -> jax.Array:
        """The LM head [vocab_size, d_model] float32: the token embedding (tied) or the head's
        kernel, transposed."""
        return self.embed.embedding[...] if self.head is None else self.head.kernel[...].T

    def _head(self, x):
        """Final norm and LM head in float32 (our choice, also for a bfloat16 model: the logits and
        the loss keep float32 precision): x [..., d_model] -> logits [..., vocab_size] float32."""
        return jnp.einsum("...d,vd->...v", self.norm(x).astype(jnp.float32), self._head_weights())

    # ------------------------------------------------------- streaming (docs/design.md section 5)

    def init_cache(self, batch_size: int, max_length=None) -> Cache:
        """An empty decoding `Cache`: position 0 and one fixed-size state per layer (see the
        mixers' `init_state`).

        Args:
          batch_size: sequences decoded together.
          max_length: tokens a full-attention (`A`) layer can hold; required when the model has
            one, unused otherwise (the other mixers' state does not grow with the context).

        Raises:
          ValueError: an `A` layer and no max_length.
        """
        return Cache(position=jnp.zeros((), jnp.int32),
                     layers=tuple(block.mixer.init_state(batch_size, max_length)
                                  for block in self.blocks))

    def prefill(self, tokens: at.Tokens, cache: Cache, *,
                eidetic_scores: at.Scores | None = None,
                segment_ids: at.SegmentIds | None = None) -> tuple[at.Logits, Cache]:
        """Consumes a prompt in parallel: tokens int [batch, time] and an empty cache (from
        `init_cache`) -> (logits [batch, time, vocab_size] float32, the cache after the prompt).
        `eidetic_scores`, `segment_ids`: as in `forward`; with packed documents, decoding
        continues each row's last document as if it had been prefilled alone.

        Raises:
          ValueError: bad tokens; a cache that is not empty (when its position is concrete); a
            prompt longer than a full-attention cache.
        """
        check_tokens(tokens, self.config.vocab_size)
        position = cache.position
        if not isinstance(position, jax.core.Tracer) and int(position) != 0:
            raise ValueError(f"prefill needs an empty cache (position 0), got position "
                             f"{int(position)}; continue with decode_step.")
        size = max((s.k.shape[1] for s, b in zip(cache.layers, self.blocks)
                    if isinstance(b.mixer, MemoryAttention) and b.mixer.window is None),
                   default=None)
        if size is not None and tokens.shape[1] > size:
            raise ValueError(f"prompt of {tokens.shape[1]} tokens exceeds the full-attention cache "
                             f"(max_length={size}).")
        (logits, states), _, _ = nnx.capture(self._prefill, nnx.Intermediate, EideticTrace)(
            tokens, size, None, eidetic_scores, None, segment_ids)
        return logits, Cache(position=jnp.asarray(tokens.shape[1], jnp.int32), layers=states)

    def decode_step(self, tokens: at.StepTokens, cache: Cache, *,
                    eidetic_scores: at.StepScores | None = None) -> tuple[at.StepLogits, Cache]:
        """One token per sequence: tokens int32 [batch] -> (logits [batch, vocab_size] float32,
        the updated cache). Reproduces the parallel forward's logits at that position.
        `eidetic_scores`: float [batch], this token's oracle score (as in `forward`), or None.

        Raises:
          ValueError: bad tokens or scores; a cache that is not this model's `init_cache` for this
            batch size (another batch size, another model).
        """
        _require_array(tokens, "token")
        if tokens.ndim != 1:
            raise ValueError(f"decode_step takes tokens [batch]; got shape {tokens.shape}.")
        check_tokens(tokens[:, None], self.config.vocab_size)
        _check_scores(eidetic_scores, tokens.shape)
        self._check_cache(cache, tokens.shape[0])
        position = cache.position
        x = self.embed(tokens)
        states = []
        for block, state in zip(self.blocks, cache.layers):
            x, state = block.step(x, state, position, eidetic_scores)
            states.append(state)
        return self._head(x), Cache(position=position + 1, layers=tuple(states))

    def _check_cache(self, cache, batch: int) -> None:
        """ValueError unless `cache` has the structure and shapes of `init_cache(batch, ...)`
        (the length of a full-attention cache is the cache's own)."""
        if not isinstance(cache, Cache) or len(cache.layers) != len(self.blocks):
            layers = len(cache.layers) if isinstance(cache, Cache) else None
            raise ValueError(f"decode_step: the cache is not one of this model's (init_cache): "
                             f"{'not a Cache' if layers is None else f'{layers} layers'}, the "
                             f"model has {len(self.blocks)} layers.")
        full = [s.k.shape[1] for s, b in zip(cache.layers, self.blocks)
                if isinstance(b.mixer, MemoryAttention) and b.mixer.window is None
                and hasattr(s, "k")]
        try:
            expected = jax.eval_shape(lambda: self.init_cache(batch, max(full, default=None)))
        except ValueError:
            expected = None
        got = jax.tree.structure(cache), [x.shape for x in jax.tree.leaves(cache)]
        if expected is None or got != (jax.tree.structure(expected),
                                       [x.shape for x in jax.tree.leaves(expected)]):
            batches = sorted({x.shape[0] for x in jax.tree.leaves(cache.layers) if x.ndim})
            if batches and batches != [batch]:
                raise ValueError(f"decode_step: the cache holds batch size {batches[0]}, the "
                                 f"tokens have batch size {batch}; make the cache with "
                                 f"init_cache({batch}, ...) and prefill it.")
            raise ValueError(f"decode_step: the cache was made by another model (its layer "
                             f"states' structure or shapes differ from this model's "
                             f"init_cache({batch}, ...): layers {self.config.layer_mixers!r}, "
                             f"d_model {self.config.d_model}).")


def _check_scores(eidetic_scores, shape) -> None:
    """Raises ValueError unless eidetic_scores is None or a float array of `shape`."""
    if eidetic_scores is None:
        return
    if eidetic_scores.shape != tuple(shape) or not jnp.issubdtype(eidetic_scores.dtype,
                                                                  jnp.floating):
        raise ValueError(f"eidetic_scores must be float {list(shape)} like the tokens; got dtype "
                         f"{eidetic_scores.dtype} and shape {eidetic_scores.shape}.")


def _check_segment_ids(segment_ids, shape, context) -> None:
    """Raises ValueError unless segment_ids is None or an integer array of `shape` (and no
    sequence-parallel `context`)."""
    if segment_ids is None:
        return
    if not hasattr(segment_ids, "shape") or segment_ids.shape != tuple(shape) or \
            not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"segment_ids must be integer {list(shape)} like the tokens; got "
                         f"{getattr(segment_ids, 'dtype', type(segment_ids).__name__)} "
                         f"{getattr(segment_ids, 'shape', '')}.")
    if context is not None:
        raise ValueError("segment_ids (packed documents) do not run under sequence parallelism; "
                         "pack shorter rows instead.")


def _aux_loss(sown) -> jax.Array:
    """The sum of the (already weighted) losses that layers sow as `nnx.Intermediate`s."""
    return sum(jax.tree.leaves(sown), jnp.zeros((), jnp.float32))


def _require_array(x, name: str) -> None:
    """ValueError unless x is an array (anything with a shape and a dtype: jax, numpy)."""
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise ValueError(f"{name}s must be an integer array [batch, time] (jax or numpy); got a "
                         f"{type(x).__name__}: wrap it in jnp.asarray(...).")


def check_tokens(tokens, vocab_size: int, name: str = "token", unlabelled_ok: bool = False):
    """Validates ids: 2-D integer [batch, time], time >= 1, ids in [0, vocab_size) (or negative,
    meaning unlabelled, with `unlabelled_ok`; `name` is "token" or "target" in the messages).

    The value check runs only on concrete arrays (not under jit, where the data pipeline checks).
    Raises ValueError naming the bad value, its position and the allowed range.
    """
    _require_array(tokens, name)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer) or tokens.shape[1] < 1:
        raise ValueError(f"{name}s must be integer [batch, time] with time >= 1; got dtype "
                         f"{tokens.dtype} and shape {tokens.shape}.")
    if isinstance(tokens, jax.core.Tracer):
        return
    values = np.asarray(tokens)
    bad = np.argwhere((values >= vocab_size) | ((values < 0) & (not unlabelled_ok)))
    if bad.size:
        where = tuple(int(i) for i in bad[0])
        allowed = " (or negative: unlabelled)" if unlabelled_ok else ""
        raise ValueError(f"{name} id {int(values[where])} at position {where} is out of range; "
                         f"allowed ids are 0..{vocab_size - 1}{allowed} (vocab_size={vocab_size}).")


def count_params(model: nnx.Module) -> int:
    """Number of parameters (elements of all `nnx.Param`s)."""
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def param_count(config: ModelConfig, embedding: bool = True) -> int:
    """Parameters of `LanguageModel(config)`, exact (built with `nnx.eval_shape`: nothing is
    allocated); `embedding=False` leaves out the token embedding (vocab_size x d_model)."""
    total = count_params(nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0))))
    return total if embedding else total - config.vocab_size * config.d_model


def match_d_ff(config: ModelConfig, target: int) -> ModelConfig:
    """`config` with the SwiGLU width d_ff (a multiple of 8, >= 8) whose non-embedding parameter
    count is closest to `target`: how presets are compared at one parameter count (our choice of
    knob; docs/design.md section 3 asks for close counts)."""
    def body(d_ff):
        return param_count(config.replace(d_ff=d_ff), embedding=False)
    base = config.hidden_dim
    per_unit = (body(base + 8) - body(base)) / 8
    guess = base + (target - body(base)) / per_unit
    candidates = {max(8, 8 * int(np.floor(guess / 8)) + 8 * j) for j in (-1, 0, 1, 2)}
    return config.replace(d_ff=min(candidates, key=lambda d_ff: abs(body(d_ff) - target)))
