"""Training machinery: config schema, loss, optimizer, jitted steps, evaluation, checkpoints, loop.

Notation: b batch, t time (tokens per window), V vocabulary size.

`train_and_evaluate(config, workdir)` is the whole job: build the data and the model from an
`ml_collections.ConfigDict` (schema: `default_config`), train with AdamW, evaluate on the
validation split as it goes, save orbax checkpoints, and finally evaluate on the full validation
and test splits.

Exact resume: the batch of step s is a pure function of (s, config.seed) (`lm_batch`, or a
per-epoch permutation for synthetic tasks), and a checkpoint holds the parameters, the optimizer
state and the step, so a run killed at any point and restarted with the same workdir reaches the
same parameters as an uninterrupted one. Changing `num_steps` on resume changes the learning-rate
schedule from there on.

Workdir layout:
    checkpoints/<step>/  orbax items `params`, `opt_state`, `meta` (JSON: step, config, model)
    metrics.jsonl        one JSON object a line: {"step", "split", ...}; on resume the lines after
                         the restored step are dropped, so the file matches an uninterrupted run's
    config.json          the config of the latest start, for people

Our choices: weight decay applies to matrices and higher-rank parameters only (linear kernels,
convolution kernels, the token embedding, which is also the tied LM head), never to vectors (norm
scales, biases) nor to the SSM dynamics `A_log`, `dt_bias`, `D` at any rank; the learning rate
warms up linearly from 0, then follows a cosine to `min_lr_ratio * lr` at `num_steps` (or stays
constant).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
import typing
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from ml_collections import config_dict
from tqdm import tqdm

from bmojo_jax import data as data_lib
from bmojo_jax import sharding as sharding_lib
from bmojo_jax.config import PRESET_PATTERNS, ModelConfig
from bmojo_jax.model import LanguageModel, count_params
from bmojo_jax.generation import generate

__all__ = ["default_config", "validate_config", "model_config", "load_data", "lm_loss",
           "compiler_options", "token_nll", "learning_rate_schedule", "weight_decay_mask",
           "make_optimizer", "make_train_step", "make_eval_step", "evaluate", "evaluate_split",
           "Checkpoints", "CheckpointError", "train_and_evaluate", "load_checkpoint",
           "evaluate_checkpoint"]

NO_DECAY_NAMES = ("A_log", "dt_bias", "D")
SCHEDULES = ("cosine", "constant")
DATA_NAMES = data_lib.CORPORA + tuple(data_lib.SYNTHETIC_TASKS)
EVAL_SPLITS = ("train", "valid", "test")


# --------------------------------------------------------------------------------------------------
# Config schema and validation
# --------------------------------------------------------------------------------------------------


def default_config(preset: str = "bmojo") -> ml_collections.ConfigDict:
    """The full config schema with defaults; experiment configs start from it and set fields.

    Fields (lengths in tokens, rates per step):
      model_preset: a `ModelConfig.preset` name.
      model: every `ModelConfig` field; None (unset) keeps the preset's value. `vocab_size` unset
        takes the data's vocabulary size.
      data.name: a corpus of `data.load_corpus` or a task of `data.SYNTHETIC_TASKS`.
      data.seq_len: training context t; data.eval_seq_len: evaluation context (None: seq_len).
      data.path: "text_files" only: a directory of .txt files, or a comma-separated list of files.
      data.bpe_vocab_size: BPE vocabulary of the non-PTB corpora.
      data.seed: document split of corpora; seeds of the synthetic sets (train seed, valid seed+1,
        test seed+2; our choice).
      data.task: keyword arguments of the synthetic generator (vocab_size required), e.g.
        num_kv_pairs; the generator's length argument is set from seq_len.
      data.num_train, data.num_eval: synthetic examples in the training set and in each eval set.
      optimizer: lr (peak), schedule ("cosine" | "constant"), warmup_steps, min_lr_ratio (cosine
        end / peak), weight_decay (decoupled, AdamW), clip_norm (global gradient norm), b1, b2, eps.
      num_steps, batch_size: training steps and sequences per step.
      eval_every: steps between validation evaluations; eval_batches: batches per periodic
        validation (0: the whole split); eval_batch_size: None = batch_size.
      checkpoint_every, max_to_keep: steps between checkpoints (the last step is always saved) and
        how many are kept.
      log_every: steps between training-metric lines.
      seed: model initialisation and training-batch order.
      sample: text corpora only: a sample from `prompt` printed at the end (max_new_tokens,
        temperature, top_k; top_k 0 = no truncation, temperature 0 = greedy).
      mesh_shape: device mesh (data, fsdp, tensor), one entry may be -1 (the remaining devices);
        default all devices on data. batch_size must be divisible by data * fsdp (`sharding`).
      distributed: call `jax.distributed.initialize()` first (multi-host; README).
    """
    config = ml_collections.ConfigDict()
    config.model_preset = preset
    hints = typing.get_type_hints(ModelConfig)
    config.model = ml_collections.ConfigDict(
        {f.name: config_dict.placeholder(_base_type(hints[f.name]))
         for f in dataclasses.fields(ModelConfig)})
    config.data = ml_collections.ConfigDict(dict(
        name="ptb", seq_len=128, eval_seq_len=config_dict.placeholder(int),
        path=config_dict.placeholder(str), bpe_vocab_size=4096, seed=0,
        task=ml_collections.ConfigDict(), num_train=10_000, num_eval=1_000))
    config.optimizer = ml_collections.ConfigDict(dict(
        lr=1e-3, schedule="cosine", warmup_steps=100, min_lr_ratio=0.1, weight_decay=0.1,
        clip_norm=1.0, b1=0.9, b2=0.95, eps=1e-8))
    config.num_steps = 1000
    config.batch_size = 16
    config.eval_every = 200
    config.eval_batches = 10
    config.eval_batch_size = config_dict.placeholder(int)
    config.checkpoint_every = 200
    config.max_to_keep = 3
    config.log_every = 20
    config.seed = 0
    config.sample = ml_collections.ConfigDict(dict(
        prompt="the", max_new_tokens=40, temperature=0.8, top_k=0))
    config.mesh_shape = (-1, 1, 1)
    config.distributed = False
    return config


def _base_type(hint):
    """int for `int` and `Optional[int]`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks every field of a training config (see `default_config`).

    Raises:
      ValueError: an unknown field, or a bad value; the message names the field (e.g.
        "config.num_steps") and what is allowed.
    """
    _check_fields(config, default_config(), "config")
    _check_choice("model_preset", config.model_preset, tuple(PRESET_PATTERNS))
    _check_choice("data.name", config.data.name, DATA_NAMES)
    _check_choice("optimizer.schedule", config.optimizer.schedule, SCHEDULES)
    for name in ("num_steps", "batch_size", "eval_every", "checkpoint_every", "max_to_keep",
                 "log_every", "data.seq_len", "data.bpe_vocab_size", "data.num_train",
                 "data.num_eval"):
        _check_int(name, _get(config, name), minimum=1)
    for name in ("eval_batches", "seed", "data.seed", "optimizer.warmup_steps",
                 "sample.max_new_tokens", "sample.top_k"):
        _check_int(name, _get(config, name), minimum=0)
    for name in ("data.eval_seq_len", "eval_batch_size"):
        if _get(config, name) is not None:
            _check_int(name, _get(config, name), minimum=1)
    for names, ok, rule in ((("optimizer.lr", "optimizer.eps", "optimizer.clip_norm"),
                             lambda x: x > 0, "> 0"),
                            (("optimizer.weight_decay", "sample.temperature"),
                             lambda x: x >= 0, ">= 0"),
                            (("optimizer.b1", "optimizer.b2"), lambda x: 0 <= x < 1, "in [0, 1)"),
                            (("optimizer.min_lr_ratio",), lambda x: 0 <= x <= 1, "in [0, 1]")):
        for name in names:
            value = _get(config, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not ok(value):
                raise ValueError(f"config.{name}={value!r}: must be a number {rule}.")
    if config.optimizer.warmup_steps > config.num_steps:
        raise ValueError(f"config.optimizer.warmup_steps={config.optimizer.warmup_steps} exceeds "
                         f"config.num_steps={config.num_steps}.")
    try:
        sharding_lib.resolve_mesh_shape(config.mesh_shape, None)  # the device count comes later
    except ValueError as e:
        raise ValueError(f"config.{e}") from e
    if not isinstance(config.distributed, bool):
        raise ValueError(f"config.distributed={config.distributed!r}: must be True or False.")
    if config.data.name == "text_files" and not config.data.path:
        raise ValueError("config.data.path: data.name='text_files' needs a directory of .txt files "
                         "or a comma-separated list of files.")
    synthetic = config.data.name in data_lib.SYNTHETIC_TASKS
    if synthetic and "vocab_size" not in config.data.task:
        raise ValueError(f"config.data.task.vocab_size: required for the synthetic task "
                         f"{config.data.name!r}.")
    if not synthetic and config.data.task:
        raise ValueError(f"config.data.task={dict(config.data.task)}: only synthetic tasks "
                         f"({', '.join(data_lib.SYNTHETIC_TASKS)}) take task arguments.")
    try:
        model_config(config, config.model.vocab_size or 1)
    except ValueError as e:
        raise ValueError(f"config.model (preset {config.model_preset!r}): {e}") from e


def _check_fields(config, schema, prefix):
    for key in config:
        name = f"{prefix}.{key}"
        if key not in schema:
            raise ValueError(f"{name}: unknown config field; allowed fields here: "
                             f"{', '.join(sorted(schema))}.")
        if isinstance(schema[key], ml_collections.ConfigDict) and name != "config.data.task":
            _check_fields(config[key], schema[key], name)


def _get(config, dotted):
    for key in dotted.split("."):
        config = config[key]
    return config


def _check_int(name, value, minimum):
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"config.{name}={value!r}: must be an integer >= {minimum}.")


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"config.{name}={value!r}: allowed values are {', '.join(allowed)}.")


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
    """The `ModelConfig` of a training config: the preset with the set `config.model` fields applied
    and `vocab_size` where `config.model.vocab_size` is unset.

    Raises:
      ValueError: unknown preset or an invalid model field (the message names it).
    """
    overrides = {k: v for k, v in config.model.items() if v is not None}
    overrides.setdefault("vocab_size", vocab_size)
    return ModelConfig.preset(config.model_preset, **overrides)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


class TextData:
    """A tokenized corpus: random training windows and contiguous evaluation windows."""

    with_accuracy = False

    def __init__(self, config: ml_collections.ConfigDict):
        path = config.data.path
        if path and "," in path:
            path = [p.strip() for p in path.split(",")]
        self.corpus = data_lib.load_corpus(config.data.name, path=path, seed=config.data.seed,
                                           vocab_size=config.data.bpe_vocab_size)
        self.vocab_size = self.corpus.vocab_size
        self.batch_size, self.seq_len, self.seed = (config.batch_size, config.data.seq_len,
                                                    config.seed)

    def train_batch(self, step: int):
        """(inputs, targets) int32 [b, t] of step `step`: a pure function of (step, seed)."""
        return data_lib.lm_batch(self.corpus.train, self.batch_size, self.seq_len, step, self.seed)

    def eval_batches(self, split: str, batch_size: int, seq_len: int):
        """[(inputs, targets) int32 [b, t]] covering the whole split (`lm_eval_batches`)."""
        return data_lib.lm_eval_batches(getattr(self.corpus, split), batch_size, seq_len)

    def n_bytes(self, split: str):
        """UTF-8 bytes of the split, or None where unknown (PTB)."""
        return self.corpus.n_bytes[split] if self.corpus.n_bytes else None


class SyntheticData:
    """A synthetic task: a fixed training set of `data.num_train` examples, visited in a fresh
    permutation each epoch (seeded by (seed, epoch)); `data.num_eval` examples per eval split."""

    with_accuracy = True

    def __init__(self, config: ml_collections.ConfigDict):
        self.generator = data_lib.SYNTHETIC_TASKS[config.data.name]
        self.name, self.task = config.data.name, dict(config.data.task)
        self.vocab_size = self.task["vocab_size"]
        self.data_seed, self.num_train, self.num_eval = (config.data.seed, config.data.num_train,
                                                         config.data.num_eval)
        self.batch_size, self.seed = config.batch_size, config.seed
        self.train = self._generate(config.data.seq_len, self.num_train, self.data_seed)

    def _generate(self, seq_len, num_examples, seed):
        length = "input_seq_len" if self.name == "mqar" else "seq_len"
        return self.generator(**self.task, **{length: seq_len}, num_examples=num_examples,
                              seed=seed)

    def train_batch(self, step: int):
        """(inputs, targets) int32 [b, t]: examples step*b .. step*b + b - 1 of the epoch order."""
        inputs, targets = self.train
        n = len(inputs)
        epochs, offsets = np.divmod(np.arange(step * self.batch_size,
                                              (step + 1) * self.batch_size), n)
        index = np.empty(self.batch_size, np.int64)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            index[chosen] = np.random.default_rng([self.seed, int(epoch)]).permutation(n)[
                offsets[chosen]]
        return inputs[index], targets[index]

    def eval_batches(self, split: str, batch_size: int, seq_len: int):
        """[(inputs, targets) int32 [b, t]]: `data.num_eval` examples of the split at length t (for
        "train", the first ones of the training set), the last batch padded with rows of ignored
        targets."""
        if split == "train":
            num, seed = self.num_train, self.data_seed
        else:
            num, seed = self.num_eval, self.data_seed + EVAL_SPLITS.index(split)
        inputs, targets = (x[:self.num_eval] for x in self._generate(seq_len, num, seed))
        pad = -len(inputs) % batch_size
        inputs = np.pad(inputs, ((0, pad), (0, 0)))
        targets = np.pad(targets, ((0, pad), (0, 0)), constant_values=data_lib.IGNORE_INDEX)
        return [(inputs[i:i + batch_size], targets[i:i + batch_size])
                for i in range(0, len(inputs), batch_size)]

    def n_bytes(self, split: str):
        return None


def load_data(config: ml_collections.ConfigDict):
    """`TextData` for corpora, `SyntheticData` for synthetic tasks.

    Raises:
      data.MissingDataError: a corpus is not installed; ValueError: bad task arguments.
    """
    return (SyntheticData if config.data.name in data_lib.SYNTHETIC_TASKS else TextData)(config)


# --------------------------------------------------------------------------------------------------
# Loss, optimizer, steps, evaluation
# --------------------------------------------------------------------------------------------------


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


def lm_loss(model: LanguageModel, inputs, targets):
    """Training loss: mean cross-entropy over labelled targets plus the model's auxiliary loss (the
    already-weighted innovation losses that B'MOJO layers sow), via `LanguageModel.cross_entropy`
    (the logits are never materialised).

    Args:
      model: a `LanguageModel`; inputs: int32 [b, t]; targets: int32 [b, t], negative (e.g.
        data.IGNORE_INDEX = -100) = unlabelled.

    Returns:
      (loss, metrics): float32 scalar; {"ce", "aux_loss", "tokens"} scalars (nats, nats, count).
    """
    ce, tokens, aux = model.cross_entropy(inputs, targets)
    return ce + aux, {"ce": ce, "aux_loss": aux, "tokens": tokens}


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


@functools.lru_cache(maxsize=None)
def _graphdef(model_cfg: ModelConfig) -> nnx.GraphDef:
    return nnx.graphdef(nnx.eval_shape(lambda: LanguageModel(model_cfg, rngs=nnx.Rngs(0))))


def make_train_step(model_cfg: ModelConfig, config: ml_collections.ConfigDict, mesh=None):
    """A jitted `(params, opt_state, inputs, targets) -> (params, opt_state, metrics)` with the
    optimizer of `make_optimizer(config)`.

    params is the `nnx.Param` state of `nnx.split(model, nnx.Param)`; inputs and targets are int32
    [b, t]; params and opt_state are donated. metrics: float32 scalars "loss", "ce", "aux_loss",
    "grad_norm" (before clipping). Cached by value (our choice): equal configs share one jitted
    function, so several runs in one process (tests, sweeps, resume) compile once.

    With a `mesh` (`sharding.make_mesh`) the step is jitted with in/out shardings: params and
    opt_state split by `sharding.PARAM_RULES`, the batch rows over ("data", "fsdp"), metrics
    replicated; XLA inserts the collectives (`sharding.shard_tree`, `sharding.host_batch` place
    the arguments).
    """
    return _train_step(model_cfg, ml_collections.FrozenConfigDict(config), mesh)


@functools.lru_cache(maxsize=8)
def _train_step(model_cfg: ModelConfig, config: ml_collections.FrozenConfigDict, mesh=None):
    graphdef, optimizer = _graphdef(model_cfg), make_optimizer(config)

    def loss_fn(params, inputs, targets):
        return lm_loss(nnx.merge(graphdef, params), inputs, targets)

    def train_step(params, opt_state, inputs, targets):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, inputs, targets)
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


@functools.lru_cache(maxsize=8)
def make_eval_step(model_cfg: ModelConfig, mesh=None):
    """A jitted `(params, inputs, targets) -> {"nll_sum", "tokens", "predictions"}`: summed NLL
    (nats) and count over labelled targets, and argmax predictions int32 [b, t]. Cached by value.
    With a `mesh`, the outputs are replicated on it (readable on every host)."""
    graphdef = _graphdef(model_cfg)

    def eval_step(params, inputs, targets):
        logits = nnx.merge(graphdef, params)(inputs)
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


def evaluate_split(eval_step, params, data, split: str, batch_size: int, seq_len: int,
                   max_batches: int = 0) -> dict:
    """`evaluate` on `split` of `data` at context `seq_len`, on its first `max_batches` batches
    (0: all; bits per byte only then)."""
    batches = data.eval_batches(split, batch_size, seq_len)
    complete = not max_batches or max_batches >= len(batches)
    return evaluate(eval_step, params, batches if complete else batches[:max_batches],
                    n_bytes=data.n_bytes(split) if complete else None,
                    with_accuracy=data.with_accuracy)


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be read; the message names its path. Nothing is deleted."""


class Checkpoints:
    """Orbax `CheckpointManager` over `directory`, one step directory per save with the items
    `params`, `opt_state` (pytrees) and `meta` (JSON). Saving is synchronous (our choice: a save
    is complete when `save` returns)."""

    def __init__(self, directory, max_to_keep: int | None = None, *, create: bool = True):
        """max_to_keep: None keeps every checkpoint; create: make `directory` if it is missing."""
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)))

    def restore(self, step: int | None, params=None, opt_state=None):
        """Restores the checkpoint of `step` (None: the latest).

        Args:
          params, opt_state: pytrees of arrays (or ShapeDtypeStructs) giving the structure; an item
            left None is not read.

        Returns:
          (meta, params, opt_state), the unread items None.

        Raises:
          FileNotFoundError: no such checkpoint (the message names the directory and its steps).
          CheckpointError: the checkpoint is unreadable or does not match the given structure.
        """
        steps = list(self.manager.all_steps())
        step = self.latest_step() if step is None else step
        if step is None or step not in steps:
            raise FileNotFoundError(f"no checkpoint {'' if step is None else f'of step {step} '}in "
                                    f"{self.directory} (saved steps: {sorted(steps)}).")
        items = {"meta": ocp.args.JsonRestore()}
        for name, tree in (("params", params), ("opt_state", opt_state)):
            if tree is not None:
                items[name] = ocp.args.StandardRestore(
                    jax.tree.map(ocp.utils.to_shape_dtype_struct, tree))
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax and tensorstore raise many types on bad files
            others = sorted(s for s in steps if s != step)
            raise CheckpointError(
                f"cannot restore the checkpoint {self.directory / str(step)}: it is corrupt, "
                f"incomplete, or of a different model ({type(e).__name__}: {e}). Nothing was "
                f"deleted; other checkpoints there: steps {others}. Move the bad directory aside "
                f"to use an earlier one.") from e
        return restored["meta"], restored.get("params"), restored.get("opt_state")

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc_info) -> None:
        self.manager.close()


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------


class MetricsLog:
    """JSON lines at `path`. Opening drops the lines whose "step" exceeds `keep_through_step`, and
    any unreadable line (a run killed mid-write). Multi-host: process 0 alone writes."""

    def __init__(self, path, keep_through_step: int):
        self.path = Path(path)
        self.enabled = jax.process_index() == 0
        if self.enabled and self.path.exists():
            def keep(line):
                try:
                    return json.loads(line)["step"] <= keep_through_step
                except (ValueError, KeyError, TypeError):
                    return False
            kept = [line for line in self.path.read_text().splitlines() if keep(line)]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir) -> dict:
    """Trains and evaluates as `config` says, in `workdir`, resuming from its latest checkpoint.

    Prints the validation results every `eval_every` steps and the final ones; shows a progress bar
    (loss, tokens/s, ETA).

    Returns:
      {"step", "params": parameter count, "valid": full-split `evaluate` result, "test": same,
       "sample": generated text (text corpora only)}.

    Raises:
      ValueError: a bad config value, or the workdir's checkpoint is of a different model.
      CheckpointError: the latest checkpoint is unreadable (nothing is deleted).
      data.MissingDataError: the corpus is not installed.
    """
    validate_config(config)
    if config.distributed:
        sharding_lib.initialize_distributed()  # before anything touches the devices
    mesh = sharding_lib.make_mesh(config.mesh_shape)
    host_rows = sharding_lib.process_rows(mesh, config.batch_size)  # checks the batch divides
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = load_data(config)
    model_cfg = model_config(config, data.vocab_size)
    if model_cfg.vocab_size < data.vocab_size:
        raise ValueError(f"config.model.vocab_size={model_cfg.vocab_size} is smaller than the "
                         f"data's vocabulary ({data.vocab_size}).")
    model = LanguageModel(model_cfg, rngs=nnx.Rngs(config.seed))
    n_params = count_params(model)
    graphdef, params = nnx.split(model, nnx.Param)
    meta = {"config": config.to_dict(), "model": dataclasses.asdict(model_cfg)}
    eval_split = functools.partial(evaluate_split, make_eval_step(model_cfg, mesh), data=data,
                                   batch_size=config.eval_batch_size or config.batch_size,
                                   seq_len=config.data.eval_seq_len or config.data.seq_len)

    with Checkpoints(workdir / "checkpoints", config.max_to_keep) as checkpoints:
        # The fresh state is placed on the mesh first: a checkpoint is restored onto these
        # shardings, so a run saved on one mesh shape resumes on any other.
        params, opt_state = sharding_lib.shard_tree(
            (params, make_optimizer(config).init(params)), mesh)
        step, params, opt_state = _resume(checkpoints, params, opt_state, meta)
        if jax.process_index() == 0:
            (workdir / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        tqdm.write(f"{config.model_preset} ({model_cfg.layer_mixers}): {n_params:,} parameters; "
                   f"{config.data.name}, vocab {data.vocab_size}; starting at step {step}")
        metrics = MetricsLog(workdir / "metrics.jsonl", keep_through_step=step)
        train_step = make_train_step(model_cfg, config, mesh)
        bar = tqdm(total=config.num_steps, initial=step, unit="step", dynamic_ncols=True)
        tic, pending = time.perf_counter(), []
        while step < config.num_steps:
            # The global batch of a step is a pure function of (step, seed) on every host; each
            # host transfers only the rows of its own devices (`sharding.global_batch`).
            batch = [np.asarray(x)[host_rows] for x in data.train_batch(step)]
            params, opt_state, step_metrics = train_step(
                params, opt_state, *sharding_lib.global_batch(batch, mesh, config.batch_size))
            pending.append(step_metrics)
            step += 1
            bar.update(1)
            if step % config.log_every == 0 or step == config.num_steps:
                pending = jax.device_get(pending)  # waits for the steps, so the timing is true
                record = _train_record(config, step, pending, time.perf_counter() - tic)
                metrics.write(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}",
                                tok_s=f"{record['tokens_per_s']:,.0f}")
                tic, pending = time.perf_counter(), []
            if step % config.eval_every == 0 and step < config.num_steps:
                _log_eval(metrics, "valid", step, eval_split(params, split="valid",
                                                             max_batches=config.eval_batches))
                tic = time.perf_counter()
            if step % config.checkpoint_every == 0 or step == config.num_steps:
                checkpoints.save(step, params, opt_state, {"step": step, **meta})
        bar.close()

    results = {"step": step, "params": n_params}
    for split in ("valid", "test"):
        results[split] = eval_split(params, split=split)
        _log_eval(metrics, f"{split}_final", step, results[split])
    if isinstance(data, TextData) and config.sample.max_new_tokens:
        prompt = data.corpus.encode(config.sample.prompt)[None]
        params = jax.device_put(params, sharding_lib.replicated(mesh))  # readable on every host
        tokens = generate(nnx.merge(graphdef, params), prompt, config.sample.max_new_tokens,
                          temperature=config.sample.temperature,
                          top_k=config.sample.top_k or None, seed=config.seed)
        results["sample"] = data.corpus.decode(np.concatenate([prompt[0], tokens[0]]))
        tqdm.write(f"sample: {results['sample']}")
    return results


def _resume(checkpoints: Checkpoints, params, opt_state, meta: dict):
    """(step, params, opt_state) of the latest checkpoint, or (0, params, opt_state) if none.

    Raises ValueError if the checkpoint's model config differs from `meta["model"]`."""
    step = checkpoints.latest_step()
    if step is None:
        return 0, params, opt_state
    saved = checkpoints.restore(step)[0]["model"]
    changed = {k: (saved.get(k), v) for k, v in meta["model"].items() if saved.get(k) != v}
    if changed:
        raise ValueError(f"the checkpoint in {checkpoints.directory} is of a different model "
                         f"(field: (saved, now)): {changed}; use a new workdir.")
    _, params, opt_state = checkpoints.restore(step, params, opt_state)
    return step, params, opt_state


def _train_record(config, step: int, pending: list, seconds: float) -> dict:
    """The metrics line of the `len(pending)` steps ending at `step`: the means of their (fetched)
    metrics, and their tokens per second over `seconds`."""
    means = {k: float(np.mean([m[k] for m in pending])) for k in pending[0]}
    return {"step": step, "split": "train", **means,
            "lr": float(learning_rate_schedule(config)(step - 1)),
            "tokens_per_s": len(pending) * config.batch_size * config.data.seq_len / seconds}


def _log_eval(metrics: MetricsLog, split: str, step: int, result: dict) -> None:
    metrics.write({"step": step, "split": split, **result})
    shown = ", ".join(f"{k} {v:.4g}" for k, v in result.items() if k != "tokens")
    tqdm.write(f"step {step} {split}: {shown}")


def load_checkpoint(workdir, step: int | None = None):
    """Reads a checkpoint of a training workdir (never writes).

    Args:
      workdir: a training workdir (its `checkpoints/`).
      step: the checkpoint's step (None: the latest).

    Returns:
      (meta, model_cfg, params): meta {"step", "config": the training config as a dict, "model"},
      the `ModelConfig`, and the `nnx.Param` state (merge with the graphdef of
      `LanguageModel(model_cfg)`).

    Raises:
      FileNotFoundError: no checkpoint (the message names the path); CheckpointError: unreadable.
    """
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint directory {directory.absolute()}: train first, or "
                                f"check the workdir.")
    with Checkpoints(directory, create=False) as checkpoints:
        meta, _, _ = checkpoints.restore(step)
        model_cfg = ModelConfig(**meta["model"])
        params = nnx.split(LanguageModel(model_cfg, rngs=nnx.Rngs(0)), nnx.Param)[1]
        _, params, _ = checkpoints.restore(meta["step"], params)
    return meta, model_cfg, params


def evaluate_checkpoint(workdir, split: str = "test", *, step: int | None = None,
                        seq_len: int | None = None, batch_size: int | None = None,
                        max_batches: int = 0) -> dict:
    """Evaluates a checkpoint of `workdir` with the config saved in it.

    Args:
      workdir: a training workdir (its `checkpoints/` is read, never written).
      split: "train", "valid" or "test".
      step: the checkpoint's step (None: the latest).
      seq_len: context length t (None: the config's eval context); synthetic tasks regenerate their
        examples at this length.
      batch_size: None: the config's eval batch size.
      max_batches: evaluate the first batches only (0: the whole split).

    Returns:
      `evaluate`'s result plus "step", "split", "seq_len".

    Raises:
      FileNotFoundError: no checkpoint (the message names the path); CheckpointError: unreadable.
      ValueError: a bad split, seq_len, batch_size or max_batches.
    """
    if split not in EVAL_SPLITS:
        raise ValueError(f"split={split!r}: allowed values are {', '.join(EVAL_SPLITS)}.")
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}={value!r}: must be an integer >= 1 (or None).")
    if not isinstance(max_batches, int) or max_batches < 0:
        raise ValueError(f"max_batches={max_batches!r}: must be an integer >= 0 (0: all).")
    meta, model_cfg, params = load_checkpoint(workdir, step)
    config = ml_collections.ConfigDict(meta["config"])
    seq_len = seq_len or config.data.eval_seq_len or config.data.seq_len
    result = evaluate_split(make_eval_step(model_cfg), params, load_data(config), split,
                            batch_size or config.eval_batch_size or config.batch_size, seq_len,
                            max_batches)
    return {"step": meta["step"], "split": split, "seq_len": seq_len, **result}

