"""The training job (`train_and_evaluate`) and the evaluation of a saved checkpoint
(`evaluate_checkpoint`).

`train_and_evaluate(config, workdir)` is the whole job: build the data and the model from an
`ml_collections.ConfigDict` (schema: `default_config`), train with AdamW, evaluate on the
validation split as it goes, save orbax checkpoints, and finally evaluate on the full validation
and test splits.

Exact resume: the batch of step s is a pure function of (s, config.seed) (`lm_batch`, or a
per-epoch permutation for synthetic tasks; `data.load_data`), and a checkpoint holds the
parameters, the optimizer state and the step, so a run killed at any point and restarted with the
same workdir reaches the same parameters as an uninterrupted one. Changing `num_steps` on resume
changes the learning-rate schedule from there on.

Workdir layout:
    checkpoints/<step>/  orbax items `params`, `opt_state`, `meta` (JSON: step, config, model)
    metrics.jsonl        one JSON object a line: {"step", "split", ...}; on resume the lines after
                         the restored step are dropped, so the file matches an uninterrupted run's
    config.json          the config of the latest start, for people
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from bmojo_jax import data as data_lib
from bmojo_jax import sharding as sharding_lib
from bmojo_jax.config import check_choice
from bmojo_jax.generation import generate
from bmojo_jax.model import LanguageModel, count_params
from bmojo_jax.training.checkpoints import Checkpoints, load_checkpoint
from bmojo_jax.training.config import model_config, validate_config
from bmojo_jax.training.metrics import MetricsLog
from bmojo_jax.training.steps import (evaluate_split, learning_rate_schedule, make_eval_step,
                                      make_optimizer, make_train_step)


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
    data = data_lib.load_data(config)
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
    if isinstance(data, data_lib.TextData) and config.sample.max_new_tokens:
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
    check_choice("split", split, data_lib.SPLITS)
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}={value!r}: must be an integer >= 1 (or None).")
    if not isinstance(max_batches, int) or max_batches < 0:
        raise ValueError(f"max_batches={max_batches!r}: must be an integer >= 0 (0: all).")
    meta, model_cfg, params = load_checkpoint(workdir, step)
    config = ml_collections.ConfigDict(meta["config"])
    seq_len = seq_len or config.data.eval_seq_len or config.data.seq_len
    result = evaluate_split(make_eval_step(model_cfg), params, data_lib.load_data(config), split,
                            batch_size or config.eval_batch_size or config.batch_size, seq_len,
                            max_batches)
    return {"step": meta["step"], "split": split, "seq_len": seq_len, **result}
