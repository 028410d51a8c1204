"""Trains and evaluates a model from a config file (the library does the work:
`bmojo_jax.training.train_and_evaluate`).

    python -m experiments.train --config=experiments/configs/ptb.py:bmojo \\
        --workdir=workdir/ptb_bmojo
    python -m experiments.train --config=experiments/configs/tiny.py --workdir=/tmp/tiny \\
        --config.num_steps=10 --config.model.d_model=64

Every config field can be overridden with --config.<field>=<value>; --print_config lists every
field with its value (an unknown field's error names the closest ones; the README's table says
what each means). The config is printed at the start of a run. Re-running with the same workdir
resumes from its latest checkpoint; on a finished one it says so and stops (--reevaluate: repeat
the final evaluations).
"""

import sys
import warnings

from absl import app, flags, logging
from ml_collections import config_flags

from bmojo_jax import training
from experiments import config_fields

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. experiments/configs/ptb.py:bmojo; override a field with "
    "--config.FIELD=VALUE (every field and its value: --print_config).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.jsonl.")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Print every config field with its "
                                  "value (after the overrides) and exit; no --workdir needed.")
_REEVALUATE = flags.DEFINE_bool("reevaluate", False, "On a finished workdir, repeat the final "
                                "evaluations (default: say it is finished and stop).")
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _PRINT_CONFIG.value:
        print(config_fields.format_config(_CONFIG.value))
        return
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required (the directory of checkpoints and metrics).")
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint file at INFO
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"  # one line
    print(f"config ({_CONFIG.value.model_preset}):\n{config_fields.format_config(_CONFIG.value)}",
          flush=True)
    try:
        training.train_and_evaluate(_CONFIG.value, _WORKDIR.value, reevaluate=_REEVALUATE.value)
    except training.USER_ERRORS as e:  # one line, no traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=config_fields.parse_flags)
