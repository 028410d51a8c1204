"""Autoregressive generation on the streaming state (docs/design.md section 5).

The prompt is consumed in parallel by `LanguageModel.prefill`; every new token then costs one
`decode_step` on a fixed-size state (for all presets but full attention, whose cache is
preallocated to prompt + new tokens). Prefill and the decode loop are one jit-compiled program.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bmojo_jax.model import LanguageModel, check_tokens


def sample_logits(logits, key, temperature: float, top_k: Optional[int]):
    """Next tokens int32 [b] from logits [b, vocab]: argmax if temperature == 0, otherwise a sample
    of softmax(logits / temperature) restricted to the top_k most likely tokens (None: all; ties at
    the k-th logit are all kept)."""
    if temperature == 0:
        return logits.argmax(-1).astype(jnp.int32)
    if top_k is not None:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits / temperature).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k"))
def _generate(graphdef, state, prompt, key, *, max_new_tokens, temperature, top_k):
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(prompt.shape[0], max_length=prompt.shape[1] + max_new_tokens)
    logits, cache = model.prefill(prompt, cache)
    first = sample_logits(logits[:, -1], jax.random.fold_in(key, 0), temperature, top_k)

    def next_token(carry, index):
        token, cache = carry
        logits, cache = model.decode_step(token, cache)
        token = sample_logits(logits, jax.random.fold_in(key, index), temperature, top_k)
        return (token, cache), token

    _, rest = jax.lax.scan(next_token, (first, cache), jnp.arange(1, max_new_tokens))
    return jnp.concatenate([first[:, None], rest.T], axis=1)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def generate(model: LanguageModel, prompt, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: Optional[int] = None, seed: int = 0) -> np.ndarray:
    """Continues a prompt by sampling.

    Args:
      model: a `LanguageModel`.
      prompt: int [batch, time] token ids (time >= 1).
      max_new_tokens: tokens to add (>= 1).
      temperature: softmax temperature (> 0), or 0 for greedy argmax decoding.
      top_k: sample among the k most likely tokens only (None: all).
      seed: `jax.random` seed; equal arguments give equal samples.

    Returns:
      int32 [batch, max_new_tokens]: the new tokens (the prompt is not repeated).

    Raises:
      ValueError: bad prompt ids or shape, max_new_tokens not an integer >= 1, temperature not a
        finite number >= 0, or top_k not an integer >= 1.
    """
    prompt = jnp.asarray(prompt)
    check_tokens(prompt, model.config.vocab_size)
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 1.")
    if not isinstance(temperature, (int, float)) or not 0 <= temperature < float("inf"):
        raise ValueError(f"temperature={temperature!r}: must be a finite number > 0, or 0 for "
                         f"greedy decoding.")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k={top_k!r}: must be an integer >= 1, or None for no truncation.")
    graphdef, state = nnx.split(model)
    tokens = _generate(graphdef, state, prompt.astype(jnp.int32), jax.random.PRNGKey(seed),
                       max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k)
    return np.asarray(tokens)
