"""Helpers shared by every test suite: tests/ and the op suites next to the ops
(bmojo_jax/ops/<op>/<op>_test.py).

Plain functions, imported as `from tests import helpers`: pytest applies tests/conftest.py (the
fixtures) only to tests under tests/, so the op suites could not use helpers defined there. Test
modules never import each other; what two of them share lives here.
"""

from __future__ import annotations

from typing import Callable, Sequence

import chex
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np

import bmojo_jax as bj

# The tiny model of the model-level suites (test_model, test_decoding, test_pallas): T tokens span
# 8 chunks of WINDOW tokens (the last partial), so eidetic slots get used.
T, WINDOW, VOCAB = 29, 4, 50
SMALL = dict(vocab_size=VOCAB, d_model=16, n_heads=2, window=WINDOW, d_state=4, ssm_head_dim=8,
             chunk_size=8, eidetic_per_chunk=1, eidetic_slots=3)


# Every eidetic selection rule but the default ("fading"), as `config("bmojo", **overrides)`
# overrides (fixed seeds for the controls; a quantile gate that rejects tokens the ungated rule
# keeps, tests/test_decoding.py).
RULES = {
    "threshold": dict(eidetic_selection="threshold", eidetic_threshold=1.0),
    "quantile": dict(eidetic_selection="quantile", eidetic_quantile=0.75, eidetic_per_chunk=2,
                     eidetic_slots=4),
    "learned": dict(eidetic_selection="learned"),
    "state": dict(eidetic_selection="state"),
    "random": dict(eidetic_selection="random", eidetic_seed=3),
    "projection": dict(eidetic_selection="projection", eidetic_seed=3),
}


def keys(n: int, seed: int = 0):
    """n PRNG keys from `seed` (data of a test: fixed seeds keep failures reproducible)."""
    return jax.random.split(jax.random.PRNGKey(seed), n)


def config(preset: str, **overrides) -> bj.ModelConfig:
    """The `preset`'s config at the SMALL sizes (no eidetic slots for "bmojo_f"), then
    `overrides`."""
    values = dict(SMALL)
    if preset == "bmojo_f":
        values.update(eidetic_per_chunk=0, eidetic_slots=0)
    values.update(overrides)
    return bj.ModelConfig.preset(preset, **values)


def tokens(seed: int = 0, t: int = T):
    """int32 [2, t] random token ids in [0, VOCAB)."""
    return jax.random.randint(jax.random.PRNGKey(seed), (2, t), 0, VOCAB)


def vjp_all(fn: Callable, args: Sequence, seed: int = 7):
    """Outputs of fn(*args) and the VJP of one random cotangent on every output.

    A random cotangent on every output (e.g. both `y` and the final state of a scan) checks every
    output's gradient path at once. Arguments that are None are held fixed (no gradient).

    Returns:
      (outputs, gradients): gradients is a tuple with one entry per non-None argument.
    """
    idx = [i for i, a in enumerate(args) if a is not None]

    def f(*live):
        full = list(args)
        for i, a in zip(idx, live):
            full[i] = a
        return fn(*full)

    out, vjp = jax.vjp(jax.jit(f), *[args[i] for i in idx])
    leaves, treedef = jax.tree.flatten(out)
    cot = treedef.unflatten([jax.random.normal(k, o.shape, jnp.float32).astype(o.dtype)
                             for o, k in zip(leaves, keys(len(leaves), seed))])
    return out, vjp(cot)


def assert_allclose(actual, expected, tol: float):
    """Same tree structure and shapes, finite, and |actual - expected| <= tol (1 + |expected|)
    elementwise (rtol = atol = tol)."""
    chex.assert_tree_all_finite(actual)
    chex.assert_trees_all_close(actual, expected, rtol=tol, atol=tol)


def assert_close_to_scale(actual, expected, tol: float):
    """Same tree structure and shapes, finite, and per leaf
    |actual - expected| <= tol * max(1, max|expected|): an error bound relative to the largest
    value, for sums whose terms cancel."""
    chex.assert_tree_all_finite(actual)
    chex.assert_trees_all_equal_shapes(actual, expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
        scale = max(1.0, float(np.max(np.abs(e), initial=0.0)))
        np.testing.assert_allclose(a, e, rtol=0, atol=tol * scale)


def assert_vjp_matches(fn: Callable, reference: Callable, args: Sequence, check: Callable, *,
                       seed: int = 7):
    """fn and reference agree on args: outputs, and the VJP of the same random cotangent on every
    output (`vjp_all`).

    Args:
      fn, reference: the implementation under test and the oracle, same signature.
      args: their arguments (None entries are held fixed).
      check: `check(actual, expected, grad)` asserts closeness; grad is False for the outputs and
        True for the gradients (which usually get a larger tolerance).

    Returns:
      (outputs, gradients) of fn, for further checks (dtypes, ...).
    """
    out, grads = vjp_all(fn, args, seed)
    ref_out, ref_grads = vjp_all(reference, args, seed)
    check(out, ref_out, grad=False)
    check(grads, ref_grads, grad=True)
    return out, grads


def lower_with_gradients(fn: Callable, args: Sequence, platform: str):
    """Traces and lowers fn and the gradient of the sum of its outputs (w.r.t. every argument) for
    `platform` ("tpu", "cuda", ...) without that device: catches primitives it cannot lower. Both
    are fresh closures, so no trace cached for another backend is reused."""
    def forward(*a):
        return fn(*a)

    def loss(*a):
        return sum(jnp.sum(o.astype(jnp.float32)) for o in jax.tree.leaves(fn(*a)))

    for f in (forward, jax.grad(loss, argnums=tuple(range(len(args))))):
        jax.jit(f).trace(*args).lower(lowering_platforms=(platform,))


def jaxpr_equations(jaxpr):
    """Every equation of a `jax.extend.core.Jaxpr`, those of its sub-jaxprs (scan, cond,
    checkpoint, custom_vjp bodies, ...) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from jaxpr_equations(sub)
