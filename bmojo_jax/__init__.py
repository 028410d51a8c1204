"""bmojo_jax: B'MOJO hybrid state-space realizations (eidetic + fading memory) in JAX."""

from bmojo_jax.config import PRESET_PATTERNS, ModelConfig
from bmojo_jax.generation import generate, generate_text
from bmojo_jax.model import LanguageModel, count_params, match_d_ff, param_count

PRESETS = tuple(PRESET_PATTERNS)


def load(workdir, step=None, model_overrides=None):
    """A trained run of a training workdir, ready for generation in a notebook:
    `model, tokenizer, config, step = bmojo_jax.load(workdir)` (the run's own tokenizer, or the
    synthetic task's description; `model_overrides`, e.g. dict(eidetic_slots=0,
    eidetic_per_chunk=0), runs the trained weights with a memory changed;
    `bmojo_jax.training.checkpoints.load` documents it all). Imports the training machinery
    (orbax) on first use."""
    from bmojo_jax.training.checkpoints import load as _load
    return _load(workdir, step, model_overrides)


__all__ = ["ModelConfig", "LanguageModel", "count_params", "param_count", "match_d_ff", "generate",
           "generate_text", "PRESETS", "load"]
