"""Samples text from a checkpoint of a training workdir, on the fixed-size streaming state
(`generation.generate_text`: parallel prefill of the prompt, then one decode step per token; it
warns about prompt words outside the vocabulary and stops at the end-of-text token).

    python -m experiments.generate --workdir=workdir/ptb_bmojo --prompt="the company said" \\
        --max_new_tokens=50 --temperature=0.8 --top_k=40 --seed=0
"""

import sys

from absl import app, flags, logging

import bmojo_jax
from bmojo_jax import training
from bmojo_jax.generation import generate_text

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_PROMPT = flags.DEFINE_string("prompt", "the", "Text to continue, tokenized by the run's own "
                              "tokenizer (a synthetic task's: token ids separated by spaces).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 50, "Tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 40, "Sample among the k most likely tokens (0: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STOP_AT_EOS = flags.DEFINE_bool("stop_at_eos", True, "Stop at the first end-of-text token (PTB: "
                                 "end of line).")
flags.mark_flag_as_required("workdir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    try:
        model, tokenizer, _, _ = bmojo_jax.load(_WORKDIR.value, _STEP.value)
        text = generate_text(model, tokenizer, _PROMPT.value, _MAX_NEW_TOKENS.value,
                             temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                             seed=_SEED.value, stop_at_eos=_STOP_AT_EOS.value)
    except (ValueError, FileNotFoundError, training.CheckpointError) as e:
        sys.exit(f"error: {e}")
    print(text)


if __name__ == "__main__":
    app.run(main)
