"""Evaluates a checkpoint of a training workdir with the config saved in it
(`bmojo_jax.training.evaluate_checkpoint`) and prints the result as one JSON line.

Text corpora: loss (nats/token), perplexity, bits per byte (where the byte count is known, whole
splits only). Synthetic tasks: also accuracy (argmax on labelled positions). With
--attention_mass, where the `B` layers look on the first batch: the mean softmax weight on window,
fading and eidetic keys of the positions inside the training context T and beyond it
(`diagnostics.attention_mass_by_span`, edges 0, T, seq_len). The line also names the workdir, the
command, the git commit and the machine.

    python -m experiments.evaluate --workdir=workdir/ptb_bmojo --split=test
    python -m experiments.evaluate --workdir=workdir/ptb_bmojo --split=valid --seq_len=512
    python -m experiments.evaluate --workdir=workdir/ptb_bmojo --set=eidetic_per_chunk=0 \
        --set=eidetic_slots=0 --attention_mass    # the same weights with the eidetic memory off
"""

import json
import sys
import warnings

from absl import app, flags, logging

from benchmarks import harness
from bmojo_jax import data as data_lib
from bmojo_jax import diagnostics, training
from experiments import sweep

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
_SPLIT = flags.DEFINE_enum("split", "test", data_lib.SPLITS, "Split to evaluate.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Context length in tokens (default: the "
                                "config's evaluation context).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Sequences per batch (default: the "
                                   "config's).")
_MAX_BATCHES = flags.DEFINE_integer("max_batches", 0, "Evaluate the first batches only (0: all).")
_SET = flags.DEFINE_multi_string("set", [], "FIELD=VALUE: a ModelConfig field changed at "
                                 "evaluation (VALUE a Python literal), for knobs that keep the "
                                 "trained parameters (eidetic_slots, eidetic_per_chunk, "
                                 "eidetic_selection, window, ...); repeatable.")
_ATTENTION_MASS = flags.DEFINE_bool("attention_mass", False, "Also report the attention mass of "
                                    "every B layer inside and beyond the training context, on "
                                    "the first batch.")
flags.mark_flag_as_required("workdir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint file at INFO
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"  # one line
    try:
        overrides = {}
        for item in _SET.value:
            field, sep, text = item.partition("=")
            if not sep:
                raise ValueError(f"--set {item!r}: must be FIELD=VALUE.")
            overrides[field] = sweep.literal(text)
        result = training.evaluate_checkpoint(
            _WORKDIR.value, _SPLIT.value, step=_STEP.value, seq_len=_SEQ_LEN.value,
            batch_size=_BATCH_SIZE.value, max_batches=_MAX_BATCHES.value,
            model_overrides=overrides)
        if _ATTENTION_MASS.value:
            result["attention_mass"] = _attention_mass(result["seq_len"], overrides)
    except training.USER_ERRORS as e:  # one line, no traceback
        sys.exit(f"error: {e}")
    print(json.dumps(dict(workdir=_WORKDIR.value, **result,
                          command=harness.command_line("experiments.evaluate"),
                          git_commit=harness.git_commit(), machine=harness.machine())))


def _attention_mass(seq_len: int, overrides: dict) -> dict:
    """`diagnostics.attention_mass_by_span` of the first batch of the evaluated split, edges 0,
    the training context T and `seq_len` (0 and `seq_len` alone when seq_len <= T)."""
    model, config, _ = training.load_model(_WORKDIR.value, _STEP.value, overrides)
    data = data_lib.load_data(config, tokenizer=data_lib.load_tokenizer(_WORKDIR.value))
    inputs, _ = data.eval_batches(_SPLIT.value, _BATCH_SIZE.value or config.eval_batch_size or
                                  config.batch_size, seq_len)[0]
    trained = config.data.seq_len
    edges = (0, trained, seq_len) if seq_len > trained else (0, seq_len)
    return diagnostics.attention_mass_by_span(model.eidetic_trace(inputs), edges)


if __name__ == "__main__":
    app.run(main)
