"""Trains and evaluates a model from a config file (the library does the work:
`bmojo_jax.training.train_and_evaluate`).

    python -m experiments.train --config=experiments/configs/ptb.py:bmojo \\
        --workdir=workdir/ptb_bmojo
    python -m experiments.train --config=experiments/configs/tiny.py --workdir=/tmp/tiny \\
        --config.num_steps=10 --config.model.d_model=64

Every config field can be overridden with --config.<field>=<value>. Re-running with the same
workdir resumes from its latest checkpoint.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from bmojo_jax import training

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. "
                                          "experiments/configs/ptb.py:bmojo.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.jsonl.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint file at INFO
    try:
        training.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (ValueError, FileNotFoundError, training.CheckpointError,
            training.TrainingDiverged) as e:  # no traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
