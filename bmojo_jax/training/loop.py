"""The training job (`train_and_evaluate`) and the evaluation of a saved checkpoint
(`evaluate_checkpoint`).

`train_and_evaluate(config, workdir)` is the whole job: build the data and the model from an
`ml_collections.ConfigDict` (schema: `default_config`), train with AdamW, evaluate on the
validation split as it goes, save orbax checkpoints, and finally evaluate on the full validation
and test splits.

A run ends at `num_steps`, or earlier when `config.early_stop` says so after a periodic
validation evaluation (`early_stop_reason`: a target reached, or no improvement for `patience`
evaluations). An early stop saves a checkpoint at its step and writes a "stop" record; then come
the final evaluations, as at `num_steps`. Starting again on a finished workdir trains no further:
it says why the run is finished and repeats the final evaluations (their records are appended
again).

Exact resume: the batch of step s is a pure function of (s, config.seed) (`lm_batch`, or a
per-epoch permutation for synthetic tasks; `data.load_data`), and a checkpoint holds the
parameters, the optimizer state, the step and the periodic validation results so far, so a run
killed at any point and restarted with the same workdir reaches the same parameters and the same
early-stop decision as an uninterrupted one (the decision is recomputed from the checkpoint's
validation results; metrics.jsonl is never read back). Changing `num_steps` on resume changes the
learning-rate schedule from there on; changing `early_stop` re-decides over the saved results.

Workdir layout:
    checkpoints/<step>/  orbax items `params`, `opt_state`, `meta` (JSON: step, config, model,
                         valid_history: the periodic validation results [{"step", "loss",
                         "perplexity", "accuracy" (synthetic)}] through that step)
    metrics.jsonl        one JSON object a line: {"step", "split", ...}; split "train", "valid"
                         (periodic), "stop" (an early stop: "reason" "target" or "patience",
                         "message"), "valid_final" (with "steps_to_0.9" on synthetic tasks),
                         "test_final". On resume the lines after the restored step are dropped,
                         so the file matches an uninterrupted run's
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
from bmojo_jax.training.config import (EARLY_STOP_METRICS, model_config, oracle_length,
                                       validate_config)
from bmojo_jax.training.metrics import MetricsLog
from bmojo_jax.training.steps import (evaluate_split, learning_rate_schedule, make_eval_step,
                                      make_optimizer, make_train_step)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir) -> dict:
    """Trains and evaluates as `config` says, in `workdir`, resuming from its latest checkpoint.

    Prints the validation results every `eval_every` steps and the final ones; shows a progress bar
    (loss, tokens/s, ETA). Stops at `num_steps` or as `config.early_stop` says (module docstring);
    on a finished workdir it trains no further, says why, and repeats the final evaluations.

    Returns:
      {"step": the last training step, "params": parameter count, "stop_reason": "num_steps",
       "target" or "patience" (`early_stop_reason`), "valid": full-split `evaluate` result,
       "test": same, "steps_to_0.9" (synthetic tasks only): the first evaluated step whose
       validation accuracy is >= 0.9, periodic evaluations and the final one (None if none),
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
    eval_split = functools.partial(evaluate_split, make_eval_step(
        model_cfg, mesh, oracle_length=oracle_length(config)), data=data,
                                   batch_size=config.eval_batch_size or config.batch_size,
                                   seq_len=config.data.eval_seq_len or config.data.seq_len)

    with Checkpoints(workdir / "checkpoints", config.max_to_keep) as checkpoints:
        # The fresh state is placed on the mesh first: a checkpoint is restored onto these
        # shardings, so a run saved on one mesh shape resumes on any other.
        params, opt_state = sharding_lib.shard_tree(
            (params, make_optimizer(config).init(params)), mesh)
        step, params, opt_state, history = _resume(checkpoints, params, opt_state, meta)
        if jax.process_index() == 0:
            (workdir / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        stop = _stop(config, step, history)
        tqdm.write(f"{config.model_preset} ({model_cfg.layer_mixers}): {n_params:,} parameters; "
                   f"{config.data.name}, vocab {data.vocab_size}; " +
                   (f"starting at step {step}" if stop is None else
                    f"finished at step {step} ({stop['message']}), not training further"))
        metrics = MetricsLog(workdir / "metrics.jsonl", keep_through_step=step)
        train_step = make_train_step(model_cfg, config, mesh)
        bar = tqdm(total=config.num_steps, initial=step, unit="step", dynamic_ncols=True,
                   disable=stop is not None)
        tic, pending = time.perf_counter(), []

        def log_train():
            nonlocal tic, pending
            pending = jax.device_get(pending)  # waits for the steps, so the timing is true
            _check_finite(pending, step, checkpoints.latest_step(), config)
            record = _train_record(config, step, pending, time.perf_counter() - tic)
            metrics.write(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
            tic, pending = time.perf_counter(), []

        while stop is None:
            # The global batch of a step is a pure function of (step, seed) on every host; each
            # host transfers only the rows of its own devices (`sharding.global_batch`).
            batch = [np.asarray(x)[host_rows] for x in data.train_batch(step)]
            params, opt_state, step_metrics = train_step(
                params, opt_state, *sharding_lib.global_batch(batch, mesh, config.batch_size))
            pending.append(step_metrics)
            step += 1
            bar.update(1)
            if step % config.log_every == 0 or step == config.num_steps:
                log_train()
            if step % config.eval_every == 0 and step < config.num_steps:
                jax.block_until_ready(pending)  # the pending steps' time stays theirs
                eval_tic = time.perf_counter()
                result = eval_split(params, split="valid", max_batches=config.eval_batches)
                _log_eval(metrics, "valid", step, result)
                history.append({"step": step, **{k: result[k] for k in EARLY_STOP_METRICS
                                                 if k in result}})
                tic += time.perf_counter() - eval_tic  # the evaluation is not training time
            stop = _stop(config, step, history)
            if stop is not None and stop["reason"] != "num_steps":
                if pending:
                    log_train()
                metrics.write({"step": step, "split": "stop", **stop})
                tqdm.write(f"step {step}: early stop, {stop['message']}")
            if step % config.checkpoint_every == 0 or stop is not None:
                # never a diverged state over a good checkpoint (max_to_keep would rotate it away)
                _check_finite(jax.device_get(pending), step, checkpoints.latest_step(), config)
                checkpoints.save(step, params, opt_state,
                                 {"step": step, **meta, "valid_history": history})
        bar.close()

    results = {"step": step, "params": n_params, "stop_reason": stop["reason"]}
    for split in ("valid", "test"):
        results[split] = eval_split(params, split=split)
        record = results[split]
        if split == "valid" and data.with_accuracy:
            final = {"step": step, "accuracy": results[split]["accuracy"]}
            results["steps_to_0.9"] = steps_to_accuracy(history + [final], 0.9)
            record = {**record, "steps_to_0.9": results["steps_to_0.9"]}
        _log_eval(metrics, f"{split}_final", step, record)
    if isinstance(data, data_lib.TextData) and config.sample.max_new_tokens:
        prompt = data.corpus.encode(config.sample.prompt)[None]
        params = jax.device_put(params, sharding_lib.replicated(mesh))  # readable on every host
        tokens = generate(nnx.merge(graphdef, params), prompt, config.sample.max_new_tokens,
                          temperature=config.sample.temperature,
                          top_k=config.sample.top_k or None, seed=config.seed)
        results["sample"] = data.corpus.decode(np.concatenate([prompt[0], tokens[0]]))
        tqdm.write(f"sample: {results['sample']}")
    return results


def early_stop_reason(early_stop: ml_collections.ConfigDict, history: list[dict]) -> dict | None:
    """Why `early_stop` (the `config.early_stop` fields, see `default_config`) stops a run after
    the periodic validation evaluations `history`, or None if it does not.

    The evaluations are replayed in order and the first one that meets a rule decides, so the
    answer for a prefix of a history is the answer the run gave when it reached that prefix.

    Args:
      early_stop: metric, target, patience, min_delta.
      history: [{"step", metric: value, ...}] in step order, as the training loop keeps them.

    Returns:
      None (no rule met, or metric None), or {"reason": "target" | "patience", "message": the rule
      in words, with the step of the evaluation that met it}.

    Raises:
      KeyError: a history entry lacks the metric.
    """
    metric = early_stop.metric
    if metric is None:
        return None
    higher_is_better = EARLY_STOP_METRICS[metric]
    best, best_step, since_best = None, None, 0
    for entry in history:
        value = entry[metric]
        if early_stop.target is not None and (value >= early_stop.target if higher_is_better
                                              else value <= early_stop.target):
            relation = ">=" if higher_is_better else "<="
            return {"reason": "target",
                    "message": f"validation {metric} {value:.6g} {relation} target "
                               f"{early_stop.target:g} at step {entry['step']}"}
        margin = early_stop.min_delta * abs(best) if best is not None else 0.0
        if best is None or (value > best + margin if higher_is_better else value < best - margin):
            best, best_step, since_best = value, entry["step"], 0
        else:
            since_best += 1
        if early_stop.patience is not None and since_best >= early_stop.patience:
            return {"reason": "patience",
                    "message": f"validation {metric} has not improved on {best:.6g} (step "
                               f"{best_step}) by min_delta={early_stop.min_delta:g} relative for "
                               f"{since_best} evaluations up to step {entry['step']} (patience "
                               f"{early_stop.patience})"}
    return None


def steps_to_accuracy(history: list[dict], threshold: float) -> int | None:
    """The step of the first entry of `history` ([{"step", "accuracy", ...}] in step order) whose
    accuracy is >= `threshold`, or None."""
    return next((entry["step"] for entry in history if entry["accuracy"] >= threshold), None)


def _stop(config, step: int, history: list[dict]) -> dict | None:
    """Why the run is finished at `step` after the validation results `history`: the early stop
    (`early_stop_reason`), else {"reason": "num_steps", ...} from num_steps on, else None."""
    stop = early_stop_reason(config.early_stop, history)
    if stop is None and step >= config.num_steps:
        stop = {"reason": "num_steps", "message": f"reached num_steps={config.num_steps}"}
    return stop


def _resume(checkpoints: Checkpoints, params, opt_state, meta: dict):
    """(step, params, opt_state, valid_history) of the latest checkpoint, or (0, params,
    opt_state, []) if none. A checkpoint saved before the history was kept gives [].

    Raises ValueError if the checkpoint's model config differs from `meta["model"]`."""
    step = checkpoints.latest_step()
    if step is None:
        return 0, params, opt_state, []
    saved_meta = checkpoints.restore(step)[0]
    saved = saved_meta["model"]
    changed = {k: (saved.get(k), v) for k, v in meta["model"].items() if saved.get(k) != v}
    if changed:
        raise ValueError(f"the checkpoint in {checkpoints.directory} is of a different model "
                         f"(field: (saved, now)): {changed}; use a new workdir.")
    _, params, opt_state = checkpoints.restore(step, params, opt_state)
    return step, params, opt_state, list(saved_meta.get("valid_history", []))


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm of a training step was not finite (NaN or inf)."""


def _check_finite(pending: list, step: int, last_checkpoint, config) -> None:
    """Raises `TrainingDiverged` when a fetched step metric of the `len(pending)` steps ending at
    `step` is not finite; nothing of it has been saved then."""
    for offset, m in enumerate(pending):
        if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
            at = step - len(pending) + offset + 1
            kept = ("no checkpoint was written" if last_checkpoint is None else
                    f"the last checkpoint, step {last_checkpoint}, is kept and nothing after it "
                    f"was saved")
            raise TrainingDiverged(
                f"training diverged at step {at}: loss {float(m['loss'])}, gradient norm "
                f"{float(m['grad_norm'])}; {kept}. Lower config.optimizer.lr (now "
                f"{config.optimizer.lr}) or raise config.optimizer.warmup_steps (now "
                f"{config.optimizer.warmup_steps}), then rerun the command to resume.")


def _train_record(config, step: int, pending: list, seconds: float) -> dict:
    """The metrics line of the `len(pending)` steps ending at `step`: the means of their (fetched)
    metrics, and their tokens per second over `seconds`."""
    means = {k: float(np.mean([m[k] for m in pending])) for k in pending[0]}
    return {"step": step, "split": "train", **means,
            "lr": float(learning_rate_schedule(config)(step - 1)),
            "tokens_per_s": len(pending) * config.batch_size * config.data.seq_len / seconds}


def _log_eval(metrics: MetricsLog, split: str, step: int, result: dict) -> None:
    metrics.write({"step": step, "split": split, **result})
    shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in result.items() if k != "tokens")
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
    result = evaluate_split(make_eval_step(model_cfg, oracle_length=oracle_length(config)), params,
                            data_lib.load_data(config), split,
                            batch_size or config.eval_batch_size or config.batch_size, seq_len,
                            max_batches)
    return {"step": meta["step"], "split": split, "seq_len": seq_len, **result}
