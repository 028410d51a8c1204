"""Autoregressive generation on the streaming state (docs/design.md section 5).

`generate` (token ids in and out) and `generate_text` (a string in, a string out, through a
tokenizer). Prefill and the decode loop are one jit-compiled program, compiled once per shape
bucket (our choice, so that a notebook can change the sampling settings and the prompt freely):

* temperature, top-k and the seed are traced values: changing them never recompiles; so are the
  exact prompt length and number of new tokens, within the buckets below;
* the prompt is padded to a bucket: a prompt of t tokens, with P the largest power of two <= t,
  is held in a [batch, 2P] array; its first P tokens are prefilled in parallel and the other
  t - P (< P) are fed by decode steps inside the same loop that then samples. Decoding reproduces
  the parallel forward (docs/design.md section 5), so the result is the unpadded prompt's;
* `max_new_tokens` is rounded up to a power of two N (the output buffer and, with full attention,
  the cache length); the loop stops after exactly `max_new_tokens` tokens.

So one program serves every prompt length in [P, 2P) and every max_new_tokens in (N/2, N], per
batch size. The cost of the bucketing: at most half of the prompt is consumed one token at a time
instead of in parallel.
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bmojo_jax.data.text import end_of_text_id
from bmojo_jax.model import LanguageModel, check_tokens


class Tokenizer(Protocol):
    """What `generate_text` needs of a tokenizer: what `bmojo_jax.load` returns (the corpora's
    `data.WordTokenizer` and `data.BPETokenizer`, a synthetic task's ids) has it."""

    unk_token: Optional[str]  # the word that stands for words outside the vocabulary, or None
    unknown_id: Optional[int]  # its id, or None where every text has ids

    def encode(self, text: str) -> np.ndarray:
        """int [t] ids of `text`."""

    def decode(self, ids) -> str:
        """The text of int ids [t]."""


def sample_logits(logits, key, temperature, top_k):
    """Next tokens int32 [b] from float logits [b, vocab].

    Args:
      logits: float [b, vocab].
      key: a `jax.random` key.
      temperature: float scalar (may be traced): 0 = argmax, > 0 = sample softmax(logits / T).
      top_k: int scalar (may be traced): sample among the top_k most likely tokens only (ties at
        the k-th logit are all kept); 0 = all tokens; values above vocab mean all.
    """
    vocab = logits.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jax.lax.dynamic_index_in_dim(jnp.sort(logits, axis=-1), vocab - k, axis=-1)  # [b, 1]
    truncated = jnp.where(logits < kth, -jnp.inf, logits)
    sampled = jax.random.categorical(key, truncated / jnp.where(temperature > 0, temperature, 1))
    return jnp.where(temperature > 0, sampled, logits.argmax(-1)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "new_bucket"))
def _generate(graphdef, state, padded, length, max_new_tokens, key, temperature, top_k, *,
              new_bucket):
    """padded int32 [b, 2P] holding the prompt in [:, :length] (length in [P, 2P)) -> int32
    [b, new_bucket], the first max_new_tokens entries the new tokens. Every argument but the
    graphdef and the buckets is traced."""
    model = nnx.merge(graphdef, state)
    batch, prefilled = padded.shape[0], padded.shape[1] // 2
    cache = model.init_cache(batch, max_length=padded.shape[1] + new_bucket)
    logits, cache = model.prefill(padded[:, :prefilled], cache)
    fed = length - prefilled  # prompt tokens fed by decode steps

    def step(i, carry):
        logits, cache, out = carry
        position = prefilled + i
        prompt_token = jax.lax.dynamic_index_in_dim(padded, position, axis=1, keepdims=False)
        new_index = jnp.maximum(position - length, 0)  # of the token sampled here
        sampled = sample_logits(logits, jax.random.fold_in(key, new_index), temperature, top_k)
        token = jnp.where(position < length, prompt_token, sampled)
        logits, cache = model.decode_step(token, cache)
        return logits, cache, out.at[:, i].set(token)

    out = jnp.zeros((batch, prefilled + new_bucket), jnp.int32)
    logits, _, out = jax.lax.fori_loop(0, fed + max_new_tokens - 1, step,
                                       (logits[:, -1], cache, out))
    last = sample_logits(logits, jax.random.fold_in(key, max_new_tokens - 1), temperature, top_k)
    out = jax.lax.dynamic_update_index_in_dim(out, last, fed + max_new_tokens - 1, axis=1)
    return jax.lax.dynamic_slice_in_dim(out, fed, new_bucket, axis=1)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _power_of_two_at_least(n: int) -> int:
    return 1 << (n - 1).bit_length()


def generate(model: LanguageModel, prompt, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: Optional[int] = None, seed: int = 0) -> np.ndarray:
    """Continues a prompt by sampling, on the streaming state (module docstring: compiled once
    per bucket of prompt length and max_new_tokens; temperature and top_k never recompile).

    Args:
      model: a `LanguageModel`.
      prompt: int [batch, time] token ids in [0, vocab_size), time >= 1, a numpy or jax array.
      max_new_tokens: tokens to add (an integer >= 0).
      temperature: softmax temperature, a finite number > 0; 0 = greedy (argmax) decoding.
      top_k: sample among the k most likely tokens only (ties at the k-th logit all kept);
        None or 0 = all tokens.
      seed: `jax.random` seed; equal arguments give equal samples, whatever the bucket (the key
        of new token j is fold_in(PRNGKey(seed), j)).

    Returns:
      int32 [batch, max_new_tokens]: the new tokens (the prompt is not repeated).

    Raises:
      ValueError: the prompt is not a [batch, time] integer array (a list, a string, 1-D, float)
        or has ids out of range; max_new_tokens not an integer >= 0; temperature not a finite
        number >= 0; top_k not None or an integer >= 0.
    """
    if not isinstance(prompt, (np.ndarray, jax.Array)):
        raise ValueError(f"prompt is a {type(prompt).__name__}: generate takes int token ids "
                         f"[batch, time] as a numpy or jax array, e.g. np.array([ids]) (for "
                         f"text use generate_text).")
    if prompt.ndim == 1:
        raise ValueError(f"prompt has shape {prompt.shape}: generate takes [batch, time]; for one "
                         f"sequence pass prompt[None].")
    check_tokens(prompt, model.config.vocab_size, name="prompt token")
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 0.")
    if not _is_real(temperature) or not 0 <= temperature < float("inf"):
        raise ValueError(f"temperature={temperature!r}: must be a finite number > 0, or 0 for "
                         f"greedy decoding.")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        raise ValueError(f"top_k={top_k!r}: must be an integer >= 1, or None or 0 for no "
                         f"truncation.")
    batch, length = prompt.shape
    if max_new_tokens == 0:
        return np.zeros((batch, 0), np.int32)
    prefilled = 1 << (length.bit_length() - 1)
    padded = np.zeros((batch, 2 * prefilled), np.int32)
    padded[:, :length] = np.asarray(prompt)
    graphdef, state = nnx.split(model)
    tokens = _generate(graphdef, state, padded, np.int32(length), np.int32(max_new_tokens),
                       jax.random.PRNGKey(seed), np.float32(temperature), np.int32(top_k or 0),
                       new_bucket=_power_of_two_at_least(max_new_tokens))
    return np.asarray(tokens)[:, :max_new_tokens]


def unknown_words(tokenizer: Tokenizer, text: str) -> list[str]:
    """The whitespace-separated words of `text` (each once, in order) that the tokenizer maps to
    its unknown id (none when it has no unknown id)."""
    unk = tokenizer.unknown_id
    if unk is None:
        return []
    return [w for w in dict.fromkeys(text.split()) if unk in np.asarray(tokenizer.encode(w))]


def generate_text(model: LanguageModel, tokenizer: Tokenizer, prompt: str,
                  max_new_tokens: int = 50, *, temperature: float = 1.0,
                  top_k: Optional[int] = None, seed: int = 0, stop_at_eos: bool = True) -> str:
    """Text in, text out: continues `prompt` with `generate`.

    Warns (`UserWarning`) when words of the prompt map to the unknown token, naming them, and
    suggests lower case when lower-casing makes some of them known (PTB is lower-case).

    Args:
      model: a `LanguageModel` trained with this tokenizer.
      tokenizer: the run's tokenizer (`bmojo_jax.load`): `encode`, `decode`, `unknown_id`,
        `unk_token` (`Tokenizer`).
      prompt: the text to continue; it must encode to at least one token.
      max_new_tokens, temperature, top_k, seed: as in `generate`.
      stop_at_eos: cut the continuation before the first end-of-text token (`end_of_text_id`;
        PTB: end of line), when the tokenizer has one.

    Returns:
      The prompt as the model read it (unknown words as <unk>) followed by the continuation:
      `tokenizer.decode(prompt ids + new ids)`.

    Raises:
      ValueError: a prompt that is not a string or encodes to no token; bad arguments as in
        `generate`.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt is a {type(prompt).__name__}: generate_text takes a string "
                         f"(token ids go to generate).")
    ids = np.asarray(tokenizer.encode(prompt), np.int32)
    if ids.size == 0:
        raise ValueError(f"prompt={prompt!r} encodes to no token: give at least one word.")
    unknown = unknown_words(tokenizer, prompt)
    if unknown:
        known_lower = [w.lower() for w in unknown
                       if w.lower() != w and not unknown_words(tokenizer, w.lower())]
        hint = (f"; in lower case {', '.join(map(repr, known_lower))} are known: the corpus is "
                f"lower-case, try prompt.lower()" if known_lower else "")
        warnings.warn(f"the prompt's words {', '.join(map(repr, unknown))} are not in the "
                      f"vocabulary and became {tokenizer.unk_token}{hint}.", stacklevel=2)
    new = generate(model, ids[None], max_new_tokens, temperature=temperature, top_k=top_k,
                   seed=seed)[0]
    eos = end_of_text_id(tokenizer) if stop_at_eos else None
    if eos is not None and eos in new:
        new = new[:int(np.argmax(new == eos))]
    return tokenizer.decode(np.concatenate([ids, new]))
