"""Compiled streaming-inference programs, shared by `benchmarks.decode` and the reproduce inference
table (no flags here): the prefill of a prompt into a fresh cache, and a greedy loop of decode
steps, both through the library's public API (`LanguageModel.init_cache`, `prefill`,
`decode_step`; docs/design.md section 5). The cache is only passed around, never looked into.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import bmojo_jax as bj
from benchmarks import harness
from bmojo_jax import training


def cache_bytes(cache) -> int:
    """Bytes of every array of a decoding cache (a pytree: its leaves' size x itemsize); works on
    abstract caches (`jax.eval_shape`) too."""
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache))


def state_bytes(model_cfg: bj.ModelConfig, batch_size: int, max_length: int) -> int:
    """Bytes of the decoding state of `batch_size` sequences with room for `max_length` tokens
    (the full-attention KV cache grows with it; the other states do not). Abstract: builds no
    arrays."""
    model = training.abstract_model(model_cfg)
    return cache_bytes(jax.eval_shape(lambda: model.init_cache(batch_size,
                                                               max_length=max_length)))


def compile_prefill(model: bj.LanguageModel, prompt, max_length: int):
    """`model.prefill` of `prompt` (int32 [batch, time]) into a fresh cache of `max_length` tokens,
    compiled once.

    Returns:
      (run, outputs): `run()` prefills and blocks (timed by `harness.interleave`); `outputs` =
      (logits float32 [batch, time, vocab], cache) of one call, to continue decoding from.
    """
    graphdef, state = nnx.split(model)
    batch = prompt.shape[0]

    def prefill(state, prompt):
        model = nnx.merge(graphdef, state)
        return model.prefill(prompt, model.init_cache(batch, max_length=max_length))

    compiled = harness.compile_once(prefill, state, prompt)
    outputs = jax.block_until_ready(compiled(state, prompt))
    return (lambda: jax.block_until_ready(compiled(state, prompt))), outputs


def compile_decode(model: bj.LanguageModel, token, cache, steps: int):
    """`steps` greedy `model.decode_step`s in one `lax.scan` from (token int32 [batch], cache),
    compiled once.

    Returns:
      `run()`: the loop from the same (token, cache) every call, blocking; divide its time by
      `steps` for the per-token latency.

    Raises:
      ValueError: steps < 1.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}: decode steps per call must be an integer >= 1.")
    graphdef, state = nnx.split(model)

    def decode(state, token, cache):
        model = nnx.merge(graphdef, state)

        def step(carry, _):
            token, cache = carry
            logits, cache = model.decode_step(token, cache)
            return (logits.argmax(-1).astype(jnp.int32), cache), None

        return jax.lax.scan(step, (token, cache), None, length=steps)[0]

    compiled = harness.compile_once(decode, state, token, cache)
    return lambda: jax.block_until_ready(compiled(state, token, cache))
