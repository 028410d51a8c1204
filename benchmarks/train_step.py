"""One jit-compiled training step (forward, next-token cross-entropy + aux loss, backward, AdamW),
shared by `benchmarks.train_throughput` and `benchmarks.peers` (no flags here). The loss is the
training loop's (`training.lm_loss`), and so are the XLA options (`training.compiler_options`); the
optimizer is plain AdamW, like the peers' steps."""

from __future__ import annotations

import ast

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import bmojo_jax as bj
from benchmarks import harness
from bmojo_jax.training import compiler_options, lm_loss


def variant_config(variant: str, **sizes) -> bj.ModelConfig:
    """A benchmark variant `PRESET[/FIELD=VALUE]...` as a `ModelConfig`: the preset at `sizes`
    (d_model, n_layers, ...) with the named `ModelConfig` fields overridden, e.g.
    `bmojo/dtype=bfloat16`, `bmojo/remat=block`, `mamba/d_ff=0` (the mixer alone). A component
    without "=" is an eidetic selection rule (`bmojo/state` = `bmojo/eidetic_selection=state`).
    Values are read as Python literals where they parse (`0`, `1e-3`, `True`), else as strings.

    Raises:
      ValueError: an unknown preset or field, or a value the field refuses (the message names it).
    """
    preset, *components = variant.split("/")
    overrides = dict(sizes)
    for component in components:
        field, sep, value = component.partition("=")
        if not sep:
            field, value = "eidetic_selection", component
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
        overrides[field] = value
    try:
        return bj.ModelConfig.preset(preset, **overrides)
    except (ValueError, TypeError) as error:
        raise ValueError(f"benchmark variant {variant!r}: {error}") from None


def compile_step(config: bj.ModelConfig, batch: int, context: int, seed: int = 0):
    """Builds the model and AdamW, compiles one training step on [batch, context] tokens
    (`harness.compile_once`).

    Returns (compiled, state): `compiled(params, opt_state, tokens) -> (params, opt_state, loss)`
    with params and opt_state donated; state = [params, opt_state, tokens, n_params].
    """
    model = bj.LanguageModel(config, rngs=nnx.Rngs(seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.1)
    opt_state = optimizer.init(params)
    tokens = jax.random.randint(jax.random.PRNGKey(seed + 1), (batch, context + 1), 0,
                                config.vocab_size, jnp.int32)

    def loss_fn(params, tokens):
        return lm_loss(nnx.merge(graphdef, params, rest), tokens[:, :-1], tokens[:, 1:])[0]

    def train_step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    compiled = harness.compile_once(train_step, params, opt_state, tokens, donate_argnums=(0, 1),
                                    compiler_options=compiler_options())
    return compiled, [params, opt_state, tokens, bj.count_params(model)]


def run_step(compiled, state):
    """One training step in place on `state` (params and opt_state are donated)."""
    state[0], state[1], loss = compiled(state[0], state[1], state[2])
    jax.block_until_ready(loss)
    return float(loss)
