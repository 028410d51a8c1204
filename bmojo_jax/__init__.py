"""bmojo_jax: B'MOJO hybrid state-space realizations (eidetic + fading memory) in JAX."""

from bmojo_jax.config import PRESET_PATTERNS, ModelConfig
from bmojo_jax.generation import generate
from bmojo_jax.model import LanguageModel, count_params, match_d_ff, param_count

PRESETS = tuple(PRESET_PATTERNS)

__all__ = ["ModelConfig", "LanguageModel", "count_params", "param_count", "match_d_ff", "generate",
           "PRESETS"]
