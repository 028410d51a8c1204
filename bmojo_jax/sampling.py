"""Reference sampler: autoregressive generation by repeated full forward passes.

Each new token costs one forward pass over the whole fixed-size buffer [b, prompt + new tokens]
(positions after the current one hold 0 and, the model being causal, cannot affect it), so the
cost is O(new tokens * buffer length) and a single compilation serves every step. This is the
simple, obviously-correct sampler; a fixed-size-state streaming decoder (DESIGN.md section 5) is the
fast path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bmojo_jax.model import check_tokens


def sample(model: nnx.Module, prompt_ids, max_new_tokens: int, *, temperature: float = 1.0,
           top_k: int | None = None, seed: int = 0) -> np.ndarray:
    """Continues `prompt_ids` by `max_new_tokens` sampled tokens.

    Args:
      model: a `LanguageModel` (int32 tokens [b, t] -> float32 logits [b, t, V]).
      prompt_ids: int [b, t0] token ids, t0 >= 1.
      max_new_tokens: number of tokens to add (>= 0).
      temperature: softmax temperature (> 0), or 0 for greedy argmax decoding.
      top_k: sample among the k most likely tokens only (None: all); ties at the k-th logit are
        all kept.
      seed: seed of the `jax.random` key; equal arguments give equal samples.

    Returns:
      int32 [b, t0 + max_new_tokens]: the prompt followed by the new tokens.

    Raises:
      ValueError: a bad prompt (see `model.check_tokens`), max_new_tokens < 0, temperature < 0, or
        top_k < 1.
    """
    prompt = np.asarray(prompt_ids)
    check_tokens(prompt, model.config.vocab_size)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 0.")
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: must be > 0, or 0 for greedy decoding.")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k}: must be >= 1, or None for no truncation.")
    batch, start = prompt.shape
    graphdef, state = nnx.split(model)

    @jax.jit
    def generate(state, tokens, key):
        def add_token(position, tokens):
            logits = nnx.merge(graphdef, state)(tokens)
            logits = jax.lax.dynamic_index_in_dim(logits, position - 1, axis=1, keepdims=False)
            if temperature == 0:
                token = logits.argmax(-1)
            else:
                if top_k is not None:
                    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
                    logits = jnp.where(logits < kth, -jnp.inf, logits)
                token = jax.random.categorical(jax.random.fold_in(key, position),
                                               logits / temperature)
            return tokens.at[:, position].set(token.astype(tokens.dtype))
        return jax.lax.fori_loop(start, start + max_new_tokens, add_token, tokens)

    tokens = np.zeros((batch, start + max_new_tokens), np.int32)
    tokens[:, :start] = prompt
    return np.asarray(generate(state, jnp.asarray(tokens), jax.random.PRNGKey(seed)))
