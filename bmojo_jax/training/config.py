"""The training config: its schema with defaults (`default_config`), its validation
(`validate_config`), the model it describes (`model_config`) and that model built abstractly
(`abstract_model`: shapes and dtypes only, no parameter memory).

Configs are `ml_collections.ConfigDict`s; experiment configs (experiments/configs/) start from
`default_config` and set fields.
"""

from __future__ import annotations

import dataclasses
import math
import typing

import ml_collections
import numpy as np
from flax import nnx
from ml_collections import config_dict

from bmojo_jax import data as data_lib
from bmojo_jax import sharding as sharding_lib
from bmojo_jax.data.pipeline import check_row_mix
from bmojo_jax.config import CROSS_DOCUMENT_SELECTIONS, PRESET_PATTERNS, ModelConfig, check_choice
from bmojo_jax.model import LanguageModel
from bmojo_jax.ops import eidetic

SCHEDULES = ("cosine", "constant")
# What a training step whose loss, gradient norm or updated parameters are not finite does
# (`default_config`: on_divergence).
ON_DIVERGENCE = ("stop", "skip", "rollback")
# Early-stopping metrics of the validation evaluations: True where higher is better.
EARLY_STOP_METRICS = {"accuracy": True, "loss": False, "perplexity": False,
                      "retrieval_accuracy": True, "retrieval_exact": True, "copy_accuracy": True}
DATA_NAMES = data_lib.CORPORA + tuple(data_lib.SYNTHETIC_TASKS)


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
      data.packed_documents: corpora only: a window's documents (each ended by the tokenizer's
        end-of-text token, `data.end_of_text_id`) run as packed documents (`segment_ids`, every
        memory restarts at a document; `data.document_segments`), in training and evaluation.
        False (default): one stream, the memories run across documents. PTB's end-of-text token
        is <eos>, which ends every line: there each sentence is a document.
      data.retrieval_fraction: corpora only: the fraction of each training batch (round(fraction
        * batch_size) rows) that are passkey and multi-key needle prompts, each followed by its
        answer, built from the training split's text (`data.retrieval_training_rows`); 0.0
        (default): plain text only. Our choice, for the long-context suite (docs/design.md
        section 7d): small models trained on text alone do not learn to retrieve at all. Every
        evaluation of such a run also reports `retrieval_accuracy` and `retrieval_exact` on
        held-out retrieval rows of the split (`TextData.retrieval_batches`).
      data.retrieval_labels: which targets of those rows the loss reads: "all" (default: the
        prompt's text and the answer) or "answer" (the answer's tokens only, so the rows'
        loss is the retrieval alone; our choice, docs/design.md section 7d).
      data.copy_fraction: corpora only: the fraction of each training batch (round(fraction *
        batch_size) rows, after the retrieval rows) that are random tokens with one passage
        written twice at a random distance (`data.copy_training_rows`); 0.0 (default): none.
        Our choice, for the long-context suite (docs/design.md section 7d): the copy teaches
        induction, which the suite's small models do not learn from text and retrieval rows.
      data.copy_only_steps: corpora only: the batches of the first copy_only_steps training
        steps are copy rows only, retrieval_fraction and copy_fraction apply after them; 0
        (default): none. Our choice (docs/design.md section 7d): a curriculum, the copy learned
        before the mix. Every evaluation of a run with copy rows also reports `copy_accuracy`
        and `copy_exact` on held-out copy rows of the split (`TextData.copy_batches`).
      data.copy_only_until: None (default: the copy-only phase lasts copy_only_steps), or a
        number in [0, 1]: the phase ends at the first periodic validation whose copy_accuracy
        reaches it, copy_only_steps being then the cap (`training.copy_phase_end`; a "curriculum"
        record in metrics.jsonl says when and why). Our choice (docs/design.md section 7d): when
        a model learns to copy varies from run to run, so the phase lasts until it has.
      data.copy_max_distance: the copy rows' largest distance between a passage's two copies, in
        passage lengths (`data.copy_training_rows`' max_distance; training and held-out rows):
        4 (default: 10% of the copies more than 128 tokens back at t = 256), 2 or 1 (every copy
        nearer, more of the targets copies; 1 repeats each passage at once).
      optimizer: lr (peak), schedule ("cosine" | "constant"), warmup_steps, min_lr_ratio (cosine
        end / peak), weight_decay (decoupled, AdamW), clip_norm (global gradient norm), b1, b2, eps.
      num_steps, batch_size: training steps and sequences per step.
      eval_every: steps between validation evaluations; eval_batches: batches per periodic
        validation (0: the whole split); eval_batch_size: None = batch_size.
      checkpoint_every, max_to_keep: steps between checkpoints (the last step is always saved) and
        how many are kept.
      log_every: steps between training-metric lines.
      early_stop: stopping before num_steps on the periodic validation evaluations (our choice of
        rules; docs/design.md section 7b: train to 99% validation accuracy or a step cap).
        metric: None (off, the default), "accuracy" (synthetic tasks; higher is better),
        "retrieval_exact" or "retrieval_accuracy" (runs with retrieval rows: the fraction of
        held-out retrieval prompts answered exactly, or of their answer tokens, teacher-forced,
        `training.evaluate_held_out`; higher is better), "copy_accuracy" (runs with copy rows,
        likewise), "loss" (nats) or "perplexity" (lower is better). Only the evaluations after
        the copy-only phase count (`training.copy_phase_end`). target: stop at the first
        evaluation whose metric reaches it (accuracy >= target, loss or perplexity <= target);
        None = off.
        patience: stop when `patience` evaluations in a row have not improved on the best one by
        more than min_delta relative (improved: accuracy > best + min_delta*|best|, loss or
        perplexity < best - min_delta*|best|); None = off. min_delta: >= 0. A set metric needs a
        target or a patience, and eval_every < num_steps.
      eidetic_oracle: None, or "context": every `B` layer's eidetic selection is handed the
        scores 1 at the synthetic task's key/value context (positions < 2 num_kv_pairs
        num_passes; `mqar` only) and 0 elsewhere, in training and evaluation (an oracle that
        brackets the selection rules; `LanguageModel.forward(eidetic_scores=...)`).
      seed: model initialisation and training-batch order.
      sample: text corpora only: a sample from `prompt` printed at the end (max_new_tokens,
        temperature, top_k; top_k 0 = no truncation, temperature 0 = greedy).
      mesh_shape: device mesh (data, fsdp, tensor) or (data, fsdp, tensor, sequence), one entry may
        be -1 (the remaining devices); sequence > 1 splits the time axis (sequence parallelism);
        default all devices on data. batch_size must be divisible by data * fsdp (`sharding`).
      distributed: call `jax.distributed.initialize()` first (multi-host; README).
      on_divergence: what a diverged training step (its loss, gradient norm or updated parameters
        not finite; checked on the device, no extra host sync) does. "stop" (default): the run
        stops with `TrainingDiverged` naming the step and the last checkpoint, having saved
        nothing non-finite. "skip": the step's update is not applied (decided on the device in the
        train step: the parameters and the optimizer state stay as before it) and training goes
        on. "rollback": the run restores its last good checkpoint (or its initial state if none)
        and goes on from there with the learning rate multiplied by rollback_lr_factor (the
        factors multiply over rollbacks; saved in the checkpoints, so a resume keeps them).
      rollback_lr_factor: in (0, 1).
      max_divergences: the most diverged steps a "skip" or "rollback" run recovers from, over the
        whole run (resumes included); one more stops it with `TrainingDiverged`.
      inject_nan_at_step: None, or a step s >= 1 whose update is made NaN (parameters, loss and
        gradient norm) the first time this process reaches it: a test hook for on_divergence.
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
        task=ml_collections.ConfigDict(), num_train=10_000, num_eval=1_000,
        packed_documents=False, retrieval_fraction=0.0, retrieval_labels="all",
        copy_fraction=0.0, copy_only_steps=0, copy_only_until=config_dict.placeholder(float),
        copy_max_distance=data_lib.COPY_MAX_DISTANCE))
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
    config.early_stop = ml_collections.ConfigDict(dict(
        metric=config_dict.placeholder(str), target=config_dict.placeholder(float),
        patience=config_dict.placeholder(int), min_delta=0.0))
    config.eidetic_oracle = config_dict.placeholder(str)
    config.seed = 0
    config.sample = ml_collections.ConfigDict(dict(
        prompt="the", max_new_tokens=40, temperature=0.8, top_k=0))
    config.mesh_shape = (-1, 1, 1)
    config.distributed = False
    config.on_divergence = "stop"
    config.rollback_lr_factor = 0.5
    config.max_divergences = 5
    config.inject_nan_at_step = config_dict.placeholder(int)
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
    _check_types(config, default_config(), "config")
    check_choice("config.model_preset", config.model_preset, tuple(PRESET_PATTERNS))
    check_choice("config.on_divergence", config.on_divergence, ON_DIVERGENCE)
    check_choice("config.data.name", config.data.name, DATA_NAMES)
    check_choice("config.optimizer.schedule", config.optimizer.schedule, SCHEDULES)
    for name in ("num_steps", "batch_size", "eval_every", "checkpoint_every", "max_to_keep",
                 "log_every", "data.seq_len", "data.bpe_vocab_size", "data.num_train",
                 "data.num_eval"):
        _check_int(name, _get(config, name), minimum=1)
    for name in ("eval_batches", "seed", "data.seed", "optimizer.warmup_steps",
                 "sample.max_new_tokens", "sample.top_k", "max_divergences"):
        _check_int(name, _get(config, name), minimum=0)
    for name in ("data.eval_seq_len", "eval_batch_size", "inject_nan_at_step"):
        if _get(config, name) is not None:
            _check_int(name, _get(config, name), minimum=1)
    for names, ok, rule in ((("optimizer.lr", "optimizer.eps", "optimizer.clip_norm"),
                             lambda x: 0 < x < math.inf, "> 0, finite"),
                            (("optimizer.weight_decay", "sample.temperature"),
                             lambda x: 0 <= x < math.inf, ">= 0, finite"),
                            (("optimizer.b1", "optimizer.b2"), lambda x: 0 <= x < 1, "in [0, 1)"),
                            (("optimizer.min_lr_ratio",), lambda x: 0 <= x <= 1, "in [0, 1]"),
                            (("rollback_lr_factor",), lambda x: 0 < x < 1, "in (0, 1)")):
        for name in names:
            value = _get(config, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not ok(value):
                raise ValueError(f"config.{name}={value!r}: must be a number {rule}.")
    if config.optimizer.warmup_steps > config.num_steps:
        raise ValueError(f"config.optimizer.warmup_steps={config.optimizer.warmup_steps} exceeds "
                         f"config.num_steps={config.num_steps}.")
    if config.optimizer.schedule == "cosine" and config.optimizer.warmup_steps == config.num_steps:
        raise ValueError(f"config.optimizer.warmup_steps={config.optimizer.warmup_steps} equals "
                         f"config.num_steps: the cosine schedule needs at least one step to decay; "
                         f"lower warmup_steps or set config.optimizer.schedule='constant'.")
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
    _check_early_stop(config, synthetic)
    fraction = config.data.get("retrieval_fraction", 0.0)
    copy_fraction = config.data.get("copy_fraction", 0.0)
    copy_only_steps = config.data.get("copy_only_steps", 0)
    check_row_mix(fraction, copy_fraction, copy_only_steps,
                  config.data.get("copy_max_distance", data_lib.COPY_MAX_DISTANCE), "config.data.")
    check_choice("config.data.retrieval_labels", config.data.get("retrieval_labels", "all"),
                 data_lib.RETRIEVAL_LABELS)
    until = config.data.get("copy_only_until")
    for name, value, used in (("retrieval_fraction", fraction, bool(fraction)),
                              ("copy_fraction", copy_fraction, bool(copy_fraction)),
                              ("copy_only_steps", copy_only_steps, bool(copy_only_steps)),
                              ("copy_only_until", until, until is not None)):
        if synthetic and used:
            raise ValueError(f"config.data.{name}={value}: corpora only; the synthetic task "
                             f"{config.data.name!r} has its own examples.")
    if until is not None:
        if not (isinstance(until, (int, float)) and not isinstance(until, bool)
                and 0 <= until <= 1):
            raise ValueError(f"config.data.copy_only_until={until!r}: must be None or a number in "
                             f"[0, 1] (the held-out copy_accuracy that ends the copy-only phase).")
        if not copy_only_steps or config.eval_every >= copy_only_steps:
            raise ValueError(f"config.data.copy_only_until={until} ends the copy-only phase at a "
                             f"periodic validation within its cap config.data.copy_only_steps="
                             f"{copy_only_steps}; it needs copy_only_steps > config.eval_every="
                             f"{config.eval_every}.")
    if config.data.get("packed_documents", False):
        if synthetic:
            raise ValueError(f"config.data.packed_documents: the synthetic task "
                             f"{config.data.name!r} has no documents to pack (each example is "
                             f"one); set it to False.")
        rule = config.model.eidetic_selection
        if rule in CROSS_DOCUMENT_SELECTIONS:
            raise ValueError(f"config.data.packed_documents: eidetic_selection={rule!r} reads "
                             f"across documents and takes no segment_ids; use another rule.")
        if len(config.mesh_shape) == 4 and config.mesh_shape[3] != 1:
            raise ValueError(f"config.data.packed_documents: not under sequence parallelism "
                             f"(mesh_shape={tuple(config.mesh_shape)}, sequence axis > 1).")
    if config.eidetic_oracle is not None:
        check_choice("config.eidetic_oracle", config.eidetic_oracle, ("context",))
        if config.data.name != "mqar":
            raise ValueError(f"config.eidetic_oracle='context' knows the context of the 'mqar' "
                             f"task only; config.data.name={config.data.name!r}.")
    try:
        model_config(config, config.model.vocab_size or 1)
    except ValueError as e:
        raise ValueError(f"config.model (preset {config.model_preset!r}): {e}") from e


def _has_rows(data_config, rows: str) -> bool:
    """Whether the run trains (and so evaluates) on retrieval or copy rows."""
    if rows == "retrieval":
        return bool(data_config.get("retrieval_fraction", 0.0))
    return bool(data_config.get("copy_fraction", 0.0) or data_config.get("copy_only_steps", 0))


def _check_early_stop(config, synthetic: bool) -> None:
    """The rules of `config.early_stop` (see `default_config`)."""
    stop = config.early_stop
    if stop.metric is None:
        for name in ("target", "patience"):
            if stop[name] is not None:
                raise ValueError(f"config.early_stop.{name}={stop[name]!r} needs "
                                 f"config.early_stop.metric (one of "
                                 f"{', '.join(EARLY_STOP_METRICS)}); it is None (off).")
    else:
        check_choice("config.early_stop.metric", stop.metric, tuple(EARLY_STOP_METRICS))
        if stop.metric == "accuracy" and not synthetic:
            raise ValueError(f"config.early_stop.metric='accuracy': only synthetic tasks report "
                             f"accuracy, config.data.name={config.data.name!r} is a corpus; use "
                             f"'loss' or 'perplexity'.")
        rows = stop.metric.split("_")[0]  # the held-out rows the metric is measured on
        if rows in ("retrieval", "copy") and not _has_rows(config.data, rows):
            field = ("retrieval_fraction" if rows == "retrieval"
                     else "copy_fraction or copy_only_steps")
            raise ValueError(f"config.early_stop.metric={stop.metric!r} is measured on held-out "
                             f"{rows} rows, which only a run with config.data.{field} > 0 "
                             f"evaluates; it is 0.")
        if stop.target is None and stop.patience is None:
            raise ValueError(f"config.early_stop.metric={stop.metric!r}: set "
                             f"config.early_stop.target or config.early_stop.patience (or both); "
                             f"both are None, so nothing would stop the run.")
        if config.eval_every >= config.num_steps:
            raise ValueError(f"config.early_stop.metric={stop.metric!r} needs periodic validation "
                             f"evaluations, but config.eval_every={config.eval_every} >= "
                             f"config.num_steps={config.num_steps} leaves none.")
    if stop.target is not None:
        low, high = {"loss": (0, None), "perplexity": (1, None)}.get(stop.metric, (0, 1))
        if (not isinstance(stop.target, (int, float)) or isinstance(stop.target, bool)
                or not low <= stop.target <= (math.inf if high is None else high)
                or stop.target == math.inf):  # also rejects NaN
            allowed = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise ValueError(f"config.early_stop.target={stop.target!r}: must be a number "
                             f"{allowed} for the metric {stop.metric!r}.")
    if stop.patience is not None:
        _check_int("early_stop.patience", stop.patience, minimum=1)
    if (not isinstance(stop.min_delta, (int, float)) or isinstance(stop.min_delta, bool)
            or not 0 <= stop.min_delta < math.inf):
        raise ValueError(f"config.early_stop.min_delta={stop.min_delta!r}: must be a number >= 0 "
                         f"(finite).")


def _check_fields(config, schema, prefix):
    for key in config:
        name = f"{prefix}.{key}"
        if key not in schema:
            raise ValueError(f"{name}: unknown config field; allowed fields here: "
                             f"{', '.join(sorted(schema))}.")
        if isinstance(schema[key], ml_collections.ConfigDict) and name != "config.data.task":
            _check_fields(config[key], schema[key], name)


def _check_types(config, schema, prefix) -> None:
    """Every set field has its schema field's type (an int where the schema has an int, never a
    bool; a finite real number where it has a float; True or False where it has a bool; a string
    where it has a string), and every set `config.model` field the `ModelConfig` field's: a config
    built from a plain dict or read from JSON carries no types, and a float field can hold NaN or
    inf. The ranges are checked by `validate_config` and `ModelConfig`."""
    hints = typing.get_type_hints(ModelConfig)
    for key in config:
        name, value = f"{prefix}.{key}", config[key]
        if key not in schema or value is None:
            continue
        if isinstance(schema[key], ml_collections.ConfigDict):
            if name != "config.data.task" and isinstance(value, ml_collections.ConfigDict):
                _check_types(value, schema[key], name)
            continue
        kind = (_base_type(hints[key]) if prefix == "config.model" and key in hints
                else schema.get_type(key))
        if kind is bool:
            ok, rule = isinstance(value, (bool, np.bool_)), "True or False"
        elif kind is int:
            ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
            rule = "an integer"
        elif kind is float:
            ok = (isinstance(value, (int, float, np.integer, np.floating))
                  and not isinstance(value, (bool, np.bool_)) and math.isfinite(value))
            rule = "a finite number"
        elif kind is str:
            ok, rule = isinstance(value, str), "a string"
        else:
            continue
        if not ok:
            raise ValueError(f"{name}={value!r}: must be {rule}.")


def _get(config, dotted):
    for key in dotted.split("."):
        config = config[key]
    return config


def _check_int(name, value, minimum):
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"config.{name}={value!r}: must be an integer >= {minimum}.")


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
    """The `ModelConfig` of a training config: the preset with the set `config.model` fields applied
    and `vocab_size` where `config.model.vocab_size` is unset.

    Raises:
      ValueError: unknown preset or an invalid model field (the message names it).
    """
    overrides = {k: v for k, v in config.model.items() if v is not None}
    overrides.setdefault("vocab_size", vocab_size)
    return ModelConfig.preset(config.model_preset, **overrides)


def unfilled_eidetic_buffer(model_cfg: ModelConfig, seq_len: int) -> str | None:
    """A warning when a model trained at `seq_len` tokens will read, past that context, eidetic
    slots older than any it trained on, else None: its `B` layers' buffer never fills within
    `seq_len` (`ops.eidetic.slots_filled` < eidetic_slots), or keeps tokens of any age
    (eidetic_eviction="score"). The long-context suite measured such models' perplexity rising
    tenfold past their training context (docs/design.md section 7d; our choice: a warning, since
    a model used within its training context is not affected).

    Args:
      model_cfg: the model (a `ModelConfig` already validated, so nothing is raised).
      seq_len: the training context (tokens).
    """
    if "B" not in model_cfg.layer_mixers or model_cfg.eidetic_per_chunk == 0:
        return None
    if model_cfg.eidetic_eviction == "score":
        return (f"ModelConfig.eidetic_eviction='score' keeps eidetic tokens of any age: past "
                f"config.data.seq_len={seq_len} tokens the model reads slots older than any it "
                f"trained on. To use it beyond its training context, prefer 'fifo' with "
                f"eidetic_slots that a training sequence fills.")
    window, per_chunk, lag = model_cfg.window, model_cfg.eidetic_per_chunk, model_cfg.eidetic_lag
    filled = eidetic.slots_filled(seq_len, window=window, per_chunk=per_chunk,
                                  slots=model_cfg.eidetic_slots, lag=lag)
    if filled == model_cfg.eidetic_slots:
        return None
    needed = (model_cfg.eidetic_slots // per_chunk + lag - 1) * window + 1
    fix = f"train at seq_len >= {needed}" + (f" or set eidetic_slots={filled}" if filled else "")
    return (f"ModelConfig.eidetic_slots={model_cfg.eidetic_slots}: training at "
            f"config.data.seq_len={seq_len} fills at most {filled} of them (window {window}, "
            f"eidetic_per_chunk {per_chunk}, eidetic_lag {lag}), so past {seq_len} tokens the "
            f"model reads more eidetic slots, and older ones, than it ever trained on. To use it "
            f"beyond its training context, {fix}.")


def document_separator(config: ml_collections.ConfigDict, data) -> int | None:
    """The end-of-text id that ends a document of `data` (a `data.load_data` source) when
    `config.data.packed_documents` is set (`data.end_of_text_id`), else None.

    Raises:
      ValueError: packed documents asked of a synthetic task, or of a tokenizer without an
        end-of-text token.
    """
    if not config.data.get("packed_documents", False):  # also configs saved before the field
        return None
    if data.with_accuracy:
        raise ValueError(f"config.data.packed_documents: the synthetic task {config.data.name!r} "
                         f"has no documents to pack (each example is one); set it to False.")
    separator = data_lib.end_of_text_id(data.corpus.tokenizer)
    if separator is None:
        raise ValueError(f"config.data.packed_documents: the tokenizer of {config.data.name!r} "
                         f"has no end-of-text token to end a document.")
    return separator


def oracle_length(config: ml_collections.ConfigDict):
    """The context length C that `config.eidetic_oracle` marks (tokens), or None when off."""
    if config.get("eidetic_oracle") is None:  # also configs saved before the field existed
        return None
    return context_length(config)


def context_length(config: ml_collections.ConfigDict) -> int:
    """The key/value context of an `mqar` config: 2 num_kv_pairs num_passes tokens at the start."""
    task = config.data.task
    return 2 * task.num_kv_pairs * task.get("num_passes", 1)


def abstract_model(model_cfg: ModelConfig) -> LanguageModel:
    """`LanguageModel(model_cfg)` built by `nnx.eval_shape`: its parameters are
    `jax.ShapeDtypeStruct`s (float32), nothing is initialised or allocated. Its graphdef and
    `nnx.Param` state give the structure that jitted steps merge into and checkpoints restore
    into."""
    return nnx.eval_shape(lambda: LanguageModel(model_cfg, rngs=nnx.Rngs(0)))
