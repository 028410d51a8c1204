"""Training: from a config file to a trained, evaluated, checkpointed model.

    config       the config schema (`default_config`), `validate_config`, `model_config`,
                 `abstract_model`
    steps        loss, optimizer, XLA options, jitted train and eval steps, evaluation
    checkpoints  orbax checkpoints (`Checkpoints`, `CheckpointError`, checked on restore) and
                 their readers (`load_checkpoint`, `load_model`, `load`; `with_overrides`)
    workdir      the workdir's lock (`WorkdirLock`) and errors (`WorkdirError`, `WorkdirLocked`)
    metrics      the JSON-lines metrics file (`MetricsLog`)
    loop         the training job (`train_and_evaluate`) and `evaluate_checkpoint`

The data sources live in `bmojo_jax.data` (`load_data`, re-exported here).
"""

from bmojo_jax.data import load_data
from bmojo_jax.training.checkpoints import (CheckpointError, Checkpoints, DataMismatchWarning,
                                            load, load_checkpoint, load_model, with_overrides)
from bmojo_jax.training.config import (abstract_model, context_length, default_config,
                                       document_separator, model_config, oracle_length,
                                       unfilled_eidetic_buffer, validate_config)
from bmojo_jax.training.loop import (TrainingDiverged, copy_phase_end, evaluate_checkpoint,
                                     train_and_evaluate)
from bmojo_jax.training.metrics import read_records
from bmojo_jax.training.steps import (compiler_options, context_scores, evaluate,
                                      evaluate_held_out, evaluate_split, learning_rate_schedule,
                                      lm_loss, make_eval_step,
                                      make_optimizer, make_train_step, token_nll,
                                      weight_decay_mask)
from bmojo_jax.training.workdir import WorkdirError, WorkdirLock, WorkdirLocked

# The errors of a user's input or environment (a bad config value, a missing or damaged file, an
# unwritable or busy workdir, a full disk, a diverged run): the command-line tools print them as one
# line, "error: <message>", and exit with status 1.
USER_ERRORS = (ValueError, OSError, CheckpointError, TrainingDiverged, WorkdirError)

__all__ = ["USER_ERRORS", "default_config", "validate_config", "model_config", "abstract_model",
           "oracle_length", "context_length", "context_scores", "load_data", "document_separator",
           "unfilled_eidetic_buffer", "lm_loss", "compiler_options", "token_nll",
           "learning_rate_schedule",
           "weight_decay_mask", "make_optimizer", "make_train_step", "make_eval_step", "evaluate",
           "evaluate_held_out", "evaluate_split", "read_records", "Checkpoints", "CheckpointError",
           "train_and_evaluate", "copy_phase_end",
           "load_checkpoint", "load_model", "with_overrides", "evaluate_checkpoint",
           "TrainingDiverged",
           "load", "DataMismatchWarning", "WorkdirError", "WorkdirLocked", "WorkdirLock"]
