"""Evaluates a checkpoint of a training workdir with the config saved in it
(`bmojo_jax.training.evaluate_checkpoint`) and prints the result as one JSON line.

Text corpora: loss (nats/token), perplexity, bits per byte (where the byte count is known, whole
splits only). Synthetic tasks: also accuracy (argmax on labelled positions).

    python -m experiments.evaluate --workdir=workdir/ptb_bmojo --split=test
    python -m experiments.evaluate --workdir=workdir/ptb_bmojo --split=valid --seq_len=512
    python -m experiments.evaluate --workdir=workdir/ptb_bmojo --set=eidetic_per_chunk=0 \
        --set=eidetic_slots=0    # the same weights with the eidetic memory off
"""

import json
import sys
import warnings

from absl import app, flags, logging

from bmojo_jax import data as data_lib
from bmojo_jax import training
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
    except training.USER_ERRORS as e:  # one line, no traceback
        sys.exit(f"error: {e}")
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
