"""The computations of training and evaluation: the loss (`token_nll`, `lm_loss`), the optimizer
(`learning_rate_schedule`, `weight_decay_mask`, `make_optimizer`), the XLA options
(`compiler_options`), the jitted train and eval steps (`make_train_step`, `make_eval_step`) and
evaluation over batches (`evaluate`, `evaluate_split`).

Notation: b batch, t time (tokens per window), V vocabulary size.

Nothing here is cached: each `make_*_step` call returns a new jitted function, compiled on its first
call. The caller (the training loop, a benchmark) builds a step once and keeps it; compiled
executables live as long as the caller holds the step.

Our choices: weight decay applies to matrices and higher-rank parameters only (linear kernels,
convolution kernels, the token embedding, which is also the tied LM head), never to vectors (norm
scales, biases) nor to the SSM dynamics `A_log`, `dt_bias`, `D` at any rank; the learning rate
warms up linearly from 0, then follows a cosine to `min_lr_ratio * lr` at `num_steps` (or stays
constant).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from bmojo_jax import data as data_lib
from bmojo_jax import sequence_parallel
from bmojo_jax import sharding as sharding_lib
from bmojo_jax.config import ModelConfig
from bmojo_jax.diagnostics import context_scores
from bmojo_jax.model import LanguageModel
from bmojo_jax.training.config import abstract_model, oracle_length

NO_DECAY_NAMES = ("A_log", "dt_bias", "D")


def token_nll(logits, targets):
    """Per-token negative log-likelihood (nats) and the label mask.

    Args:
      logits: float [b, t, V]; targets: int [b, t], negative (e.g. data.IGNORE_INDEX = -100)
        where unlabelled, as in `LanguageModel.cross_entropy`.

    Returns:
      nll: float32 [b, t], 0 where unlabelled; mask: bool [b, t].
    """
    mask = targets >= 0
    nll = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), jnp.where(mask, targets, 0))
    return jnp.where(mask, nll, 0.0), mask


def lm_loss(model: LanguageModel, inputs, targets, mesh=None, eidetic_scores=None,
            dropout_key=None, segment_ids=None):
    """Training loss: mean cross-entropy over labelled targets plus the model's auxiliary loss (the
    already-weighted innovation losses that B'MOJO layers sow), via `LanguageModel.cross_entropy`
    (the logits are never materialised).

    Args:
      model: a `LanguageModel`; inputs: int32 [b, t]; targets: int32 [b, t], negative (e.g.
        data.IGNORE_INDEX = -100) = unlabelled.
      mesh: the training mesh, or None. When its `sequence` axis has more than one device, the
        time axis is split over it (`sequence_parallel.sequence_parallel_cross_entropy`).
      eidetic_scores: optional oracle scores [b, t] (`LanguageModel.forward`).
      dropout_key: a PRNG key (training: dropout on, `LanguageModel.forward`), or None.
      segment_ids: optional int [b, t], packed documents (`LanguageModel.forward`).

    Returns:
      (loss, metrics): float32 scalar; {"ce", "aux_loss", "tokens"} scalars (nats, nats, count).

    Raises:
      ValueError: a dropout key or segment_ids with sequence parallelism (not supported).
    """
    if _sequence_parallel(mesh) and dropout_key is not None:
        raise ValueError("dropout (config.model.*_dropout > 0) does not run under sequence "
                         "parallelism (mesh_shape sequence > 1); set the rates to 0 or the "
                         "sequence axis to 1.")
    if _sequence_parallel(mesh) and segment_ids is not None:
        raise ValueError("packed documents (config.data.packed_documents) do not run under "
                         "sequence parallelism (mesh_shape sequence > 1).")
    if _sequence_parallel(mesh):
        ce, tokens, aux = sequence_parallel.sequence_parallel_cross_entropy(
            model, inputs, targets, mesh, sharding_lib.SEQUENCE_AXIS,
            batch_axis=sharding_lib.BATCH_AXES, eidetic_scores=eidetic_scores)
    else:
        ce, tokens, aux = model.cross_entropy(inputs, targets, eidetic_scores=eidetic_scores,
                                              dropout_key=dropout_key, segment_ids=segment_ids)
    return ce + aux, {"ce": ce, "aux_loss": aux, "tokens": tokens}


def _sequence_parallel(mesh) -> bool:
    return mesh is not None and mesh.shape[sharding_lib.SEQUENCE_AXIS] > 1


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Step -> learning rate: linear warmup from 0 over `warmup_steps`, then cosine decay to
    `min_lr_ratio * lr` at `num_steps` ("cosine") or constant `lr` ("constant")."""
    opt = config.optimizer
    if opt.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, opt.lr, opt.warmup_steps), optax.constant_schedule(opt.lr)],
            [opt.warmup_steps])
    return optax.warmup_cosine_decay_schedule(0.0, opt.lr, opt.warmup_steps, config.num_steps,
                                              end_value=opt.lr * opt.min_lr_ratio)


def weight_decay_mask(params):
    """Pytree of bools like `params`: True where weight decay applies (see module docstring)."""
    def decays(path, leaf):
        name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        return leaf.ndim >= 2 and name not in NO_DECAY_NAMES
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Global-norm gradient clipping, then AdamW with `learning_rate_schedule` and weight decay
    masked by `weight_decay_mask`."""
    opt = config.optimizer
    return optax.chain(
        optax.clip_by_global_norm(opt.clip_norm),
        optax.adamw(learning_rate_schedule(config), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                    weight_decay=opt.weight_decay, mask=weight_decay_mask))


def compiler_options() -> dict:
    """XLA options of our jitted training and evaluation steps, for the default backend (our
    choice, measured on CPU; `benchmarks/train_step.py` uses them too).

    On CPU, XLA (jaxlib 0.10.2) hands dots, elementwise fusions and reductions to YNNPACK by
    default. Its reduction over the time axis of a [1, t, c] array (the gradient of a per-channel
    parameter at batch 1) runs ~40x slower than XLA's own (38 ms vs 0.9 ms at t=8192, c=288), which
    made a `bmojo` training step on one 8192-token sequence 1.37x slower; so YNNPACK gets the dots
    only. Other backends: no options.
    """
    if jax.default_backend() != "cpu":
        return {}
    return {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


def dropout_key(seed: int, step) -> jax.Array:
    """The dropout PRNG key of training step `step` (int scalar, 0-based): a pure function of
    (seed, step), so a resumed run draws the masks of an uninterrupted one. Our choice of stream:
    `seed` (`config.seed`) folded with a constant that keeps it apart from the initialisation's
    `nnx.Rngs(seed)` keys, then with the step."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _DROPOUT_STREAM), step)


_DROPOUT_STREAM = 0x64726F70  # "drop"


def optimizer_step(opt_state) -> jax.Array:
    """The number of updates an opt_state of `make_optimizer` has applied (int32 scalar): the
    learning-rate schedule's count, which is the training step about to run."""
    return optax.tree_utils.tree_get(
        opt_state, "count",
        filtering=lambda path, _: getattr(path[-1], "tuple_name", None) == "ScaleByScheduleState")


def make_train_step(model_cfg: ModelConfig, config: ml_collections.ConfigDict, mesh=None, *,
                    separator: int | None = None):
    """A jitted `(params, opt_state, inputs, targets) -> (params, opt_state, metrics)` with the
    optimizer of `make_optimizer(config)`.

    params is the `nnx.Param` state of `nnx.split(model, nnx.Param)`; inputs and targets are int32
    [b, t]; params and opt_state are donated. metrics: float32 scalars "loss", "ce", "aux_loss",
    "grad_norm" (before clipping). Each call returns a new function, compiled on its first call:
    build it once and keep it (see module docstring). The config is read now; later changes to it
    do not affect the step.

    With a `mesh` (`sharding.make_mesh`) the step is jitted with in/out shardings: params and
    opt_state split by `sharding.PARAM_RULES`, the batch rows over ("data", "fsdp") and its time
    over "sequence" (sequence parallelism, see `lm_loss`), metrics replicated; XLA inserts the
    collectives (`sharding.shard_tree`, `sharding.host_batch` place the arguments).

    With dropout (`model_cfg.has_dropout`) the step's key is `dropout_key(config.seed, s)`, s the
    step read from opt_state (`optimizer_step`): nothing to pass, and exact resume holds.

    `separator`: the end-of-text id of packed documents (`training.document_separator`), or None:
    the documents of each window are found from it (`data.document_segments`).
    """
    graphdef, optimizer = nnx.graphdef(abstract_model(model_cfg)), make_optimizer(config)
    length, seed = oracle_length(config), config.seed

    def loss_fn(params, inputs, targets, key):
        segment_ids = None
        if separator is not None:
            segment_ids, targets = data_lib.document_segments(inputs, targets, separator)
        return lm_loss(nnx.merge(graphdef, params), inputs, targets, mesh,
                       context_scores(inputs, length), key, segment_ids)

    def train_step(params, opt_state, inputs, targets):
        key = dropout_key(seed, optimizer_step(opt_state)) if model_cfg.has_dropout else None
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, inputs,
                                                                           targets, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        metrics = dict(loss=loss, ce=metrics["ce"], aux_loss=metrics["aux_loss"],
                       grad_norm=optax.tree.norm(grads))
        return optax.apply_updates(params, updates), opt_state, metrics

    if mesh is None:
        return jax.jit(train_step, donate_argnums=(0, 1), compiler_options=compiler_options())
    params_sharding, opt_sharding = sharding_lib.state_shardings(model_cfg, optimizer, mesh)
    batch = sharding_lib.batch_sharding(mesh)
    return jax.jit(train_step, donate_argnums=(0, 1), compiler_options=compiler_options(),
                   in_shardings=(params_sharding, opt_sharding, batch, batch),
                   out_shardings=(params_sharding, opt_sharding, sharding_lib.replicated(mesh)))


def make_eval_step(model_cfg: ModelConfig, mesh=None, *, oracle_length=None, separator=None):
    """A jitted `(params, inputs, targets) -> {"nll_sum", "tokens", "predictions"}`: summed NLL
    (nats) and count over labelled targets, and argmax predictions int32 [b, t]. Each call returns
    a new function (see module docstring). With a `mesh`, the outputs are replicated on it
    (readable on every host). `oracle_length`: `config.oracle_length(config)` (the eidetic
    oracle's context length), or None. `separator`: as in `make_train_step` (packed documents:
    the targets that cross a document boundary are not scored)."""
    graphdef = nnx.graphdef(abstract_model(model_cfg))

    def eval_step(params, inputs, targets):
        model = nnx.merge(graphdef, params)
        scores = context_scores(inputs, oracle_length)
        segment_ids = None
        if separator is not None:
            segment_ids, targets = data_lib.document_segments(inputs, targets, separator)
            if _sequence_parallel(mesh):
                raise ValueError("packed documents (config.data.packed_documents) do not run "
                                 "under sequence parallelism (mesh_shape sequence > 1).")
        logits = (sequence_parallel.sequence_parallel_forward(
            model, inputs, mesh, sharding_lib.SEQUENCE_AXIS, batch_axis=sharding_lib.BATCH_AXES,
            eidetic_scores=scores) if _sequence_parallel(mesh) else
            model(inputs, eidetic_scores=scores, segment_ids=segment_ids))
        nll, mask = token_nll(logits, targets)
        return {"nll_sum": nll.sum(), "tokens": mask.sum(),
                "predictions": logits.argmax(-1).astype(jnp.int32)}
    if mesh is None:
        return jax.jit(eval_step, compiler_options=compiler_options())
    return jax.jit(eval_step, out_shardings=sharding_lib.replicated(mesh),
                   compiler_options=compiler_options())


def evaluate(eval_step, params, batches, *, n_bytes=None, with_accuracy=False) -> dict:
    """Evaluates `params` on `batches` [(inputs, targets) int32 [b, t]].

    Args:
      eval_step: from `make_eval_step`.
      n_bytes: UTF-8 bytes of the text the batches cover, for bits per byte (give it only when the
        batches cover the whole split).
      with_accuracy: also report `data.accuracy` (argmax on labelled positions; synthetic tasks).

    Returns:
      {"loss": mean NLL per labelled token (nats), "perplexity": exp(loss), "tokens": count,
       "bits_per_byte" (with n_bytes): total NLL / ln 2 / n_bytes, "accuracy" (with_accuracy)}.

    Raises:
      ValueError: no labelled target in the batches.
    """
    outputs = jax.device_get([eval_step(params, x, y) for x, y in batches])
    nll = sum(float(o["nll_sum"]) for o in outputs)
    tokens = sum(int(o["tokens"]) for o in outputs)
    if not tokens:
        raise ValueError("evaluate: the batches hold no labelled target.")
    result = {"loss": nll / tokens, "perplexity": math.exp(min(nll / tokens, 700.0)),
              "tokens": tokens}
    if n_bytes:
        result["bits_per_byte"] = nll / math.log(2) / n_bytes
    if with_accuracy:
        result["accuracy"] = data_lib.accuracy(
            np.concatenate([o["predictions"] for o in outputs]),
            np.concatenate([np.asarray(y) for _, y in batches]))
    return result


def evaluate_held_out(eval_step, params, batches, name: str = "retrieval") -> dict:
    """Teacher-forced held-out rows whose labelled targets are what the model must retrieve:
    `batches` [(inputs, targets) int32 [b, t]], e.g. `TextData.retrieval_batches` (the answers
    alone labelled, `data.retrieval_training_rows` with labels="answer") or
    `TextData.copy_batches` (the copied tokens, `data.copy_training_rows` with labels="copy").

    Returns:
      {f"{name}_accuracy": `data.accuracy` of the argmax predictions (per row the fraction of
       its labelled tokens predicted, then the mean over rows),
       f"{name}_exact": the fraction of rows whose every labelled token is: for retrieval, the
       rows that greedy decoding answers with exactly the answer's tokens, as
       `data.answer_correct` counts them}.

    Raises:
      ValueError: a row with no labelled target.
    """
    targets = np.concatenate([np.asarray(y) for _, y in batches])
    mask = targets != data_lib.IGNORE_INDEX
    if not mask.any(axis=1).all():
        raise ValueError(f"evaluate_held_out ({name}): a row has no labelled target.")
    predictions = np.concatenate(jax.device_get(
        [eval_step(params, x, y)["predictions"] for x, y in batches]))
    exact = ((predictions == targets) | ~mask).all(axis=1).mean()
    return {f"{name}_accuracy": data_lib.accuracy(predictions, targets),
            f"{name}_exact": float(exact)}


def evaluate_split(eval_step, params, data, split: str, batch_size: int, seq_len: int,
                   max_batches: int = 0) -> dict:
    """`evaluate` on `split` of `data` (a `data.load_data` source) at context `seq_len`, on its
    first `max_batches` batches (0: all; bits per byte only then), with a progress bar (tqdm, on
    stderr, removed when done). The bar counts finished batches: each batch is waited for before
    the next is dispatched (our choice: a true count and ETA for a small pipeline bubble). A
    source that trains on retrieval or copy rows adds `evaluate_held_out` of its held-out rows
    (`retrieval_batches`, `copy_batches`, always all of them): retrieval_accuracy,
    retrieval_exact, copy_accuracy, copy_exact."""
    batches = data.eval_batches(split, batch_size, seq_len)
    complete = not max_batches or max_batches >= len(batches)
    batches = batches if complete else batches[:max_batches]
    with tqdm(total=len(batches), desc=f"evaluating {split}", unit="batch", leave=False,
              dynamic_ncols=True) as bar:
        def counted_step(params, inputs, targets):
            outputs = jax.block_until_ready(eval_step(params, inputs, targets))
            bar.update(1)
            return outputs
        result = evaluate(counted_step, params, batches,
                          n_bytes=data.n_bytes(split) if complete else None,
                          with_accuracy=data.with_accuracy)
    for name, held_out in (("retrieval", data.retrieval_batches(split, batch_size)),
                           ("copy", data.copy_batches(split, batch_size))):
        if held_out:
            result.update(evaluate_held_out(eval_step, params, held_out, name))
    return result
