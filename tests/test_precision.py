"""Mixed precision, `ModelConfig.dtype="bfloat16"` (docs/design.md section 3): bfloat16
activations and weight matmuls; float32 parameters, optimizer state, scan states, LM head, logits
and loss; close to the float32 model; the Pallas kernels in bfloat16 (interpret mode on CPU)
against their float32-computing reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bmojo_jax as bj
from bmojo_jax import ops
from bmojo_jax.training import steps
from experiments.configs import tiny
from tests import helpers

# bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%). Through the embedding, one
# B'MOJO block and the head of the test model, measured over initialisation seeds 0, 1, 2: the
# largest logit error 1.3-1.5% of the largest logit, the loss within 0.03%, the gradients' cosine
# similarity 0.9999. (With an SSM block before it the logit error grows to 3-8%: the rounding
# can flip the discrete eidetic selection.) The tolerances leave room for other seeds and
# platforms.
LOGIT_TOL = 0.05  # |bf16 - f32| <= LOGIT_TOL * max(1, max |f32 logits|)
LOSS_RTOL = 2e-3  # the mean cross-entropy
GRAD_COSINE = 0.999  # cosine similarity of the flattened parameter gradients
# The Pallas kernels on bfloat16 inputs against the reference on the same inputs (which computes
# in float32): relative to the largest value, outputs and gradients.
KERNEL_TOL = 1e-2


def _model(dtype):
    """The test model in `dtype`: one B'MOJO layer (attention, fading SSM, eidetic memory); the
    same parameters for every dtype."""
    return bj.LanguageModel(helpers.config("bmojo", n_layers=1, dtype=dtype), rngs=nnx.Rngs(0))


def _forward_and_gradients(dtype):
    """(params, the jaxpr, (logits, cross-entropy, parameter gradients)) of the test model in
    `dtype`, in one jitted function."""
    graphdef, params = nnx.split(_model(dtype), nnx.Param)
    x, y = helpers.tokens(4), helpers.tokens(5)

    def run(params):
        def loss(params):
            ce, _, aux = nnx.merge(graphdef, params).cross_entropy(x, y)
            return ce + aux, ce
        (_, ce), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return nnx.merge(graphdef, params)(x), ce, grads

    traced = jax.jit(run).trace(params)
    return params, traced.jaxpr, traced.lower().compile()(params)


@pytest.mark.slow  # ~30 s CPU: two compiles
def test_bfloat16_is_close_to_float32_with_float32_parameters():
    """The bfloat16 model runs its weight matmuls in bfloat16; its logits, loss and gradients are
    float32, finite and close to the float32 model's (tolerances at the top of the module); an
    AdamW update keeps the parameters and the optimizer state float32."""
    params, jaxpr, (logits, ce, grads) = _forward_and_gradients("bfloat16")
    _, _, (expected, ref_ce, ref_grads) = _forward_and_gradients("float32")
    dots = [tuple(v.aval.dtype for v in e.invars) for e in helpers.jaxpr_equations(jaxpr.jaxpr)
            if e.primitive.name == "dot_general"]
    assert (jnp.bfloat16, jnp.bfloat16) in dots
    assert logits.dtype == ce.dtype == jnp.float32
    helpers.assert_close_to_scale(logits, expected, LOGIT_TOL)
    np.testing.assert_allclose(ce, ref_ce, rtol=LOSS_RTOL)
    flat, ref_flat = (jnp.concatenate([g.ravel() for g in jax.tree.leaves(t)])
                      for t in (grads, ref_grads))
    assert flat.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(flat)))
    cosine = jnp.dot(flat, ref_flat) / (jnp.linalg.norm(flat) * jnp.linalg.norm(ref_flat))
    assert cosine > GRAD_COSINE, float(cosine)
    optimizer = steps.make_optimizer(tiny.get_config("bmojo"))
    updates, opt_state = optimizer.update(grads, optimizer.init(params), params)
    floats = {a.dtype for a in jax.tree.leaves((optax.apply_updates(params, updates), opt_state))
              if jnp.issubdtype(a.dtype, jnp.floating)}
    assert floats == {jnp.dtype(jnp.float32)}


def test_bfloat16_decoding_state_is_float32():
    """The bfloat16 model's decoding cache (scan states, key/value rings, eidetic memory) is
    float32 after a prefill (shapes and dtypes only: `jax.eval_shape`)."""
    graphdef, state = nnx.split(_model("bfloat16"))

    def prefill(state):
        model = nnx.merge(graphdef, state)
        return model.prefill(helpers.tokens(), model.init_cache(2))[1]
    cache = jax.eval_shape(prefill, state)
    floats = {a.dtype for a in jax.tree.leaves(cache.layers)
              if jnp.issubdtype(a.dtype, jnp.floating)}
    assert floats == {jnp.dtype(jnp.float32)}


def _attention_inputs(t=12, window=4):
    """bfloat16 q, k, v, k_fading, v_fading [1, t, 2, 8] and eidetic slots (2 per chunk, 4)."""
    q, k, v, kf, vf = (jax.random.normal(key, (1, t, 2, 8)).astype(jnp.bfloat16)
                       for key in helpers.keys(5, seed=2))
    slots = ops.select_eidetic(jax.random.normal(jax.random.PRNGKey(3), (1, t)), window=window,
                               per_chunk=2, slots=4, lag=2, implementation="reference")
    return (q, k, v, kf, vf), dict(window=window, memory_positions=slots)


def _scan_inputs(kind, t=12):
    """bfloat16 x, B, C and float32 dt, a, h0 of `ops.ssd` (mamba2) or `ops.selective_scan`."""
    k = helpers.keys(6, seed=1)
    channels = (1, t, 2, 4) if kind == "ssd" else (1, t, 4)  # [b, t, h, p] or [b, t, d]
    decay = (2,) if kind == "ssd" else (4, 3)
    state = (1, 2, 4, 3) if kind == "ssd" else (1, 4, 3)
    return (jax.random.normal(k[0], channels).astype(jnp.bfloat16),
            jax.nn.softplus(jax.random.normal(k[1], channels[:-1] if kind == "ssd" else channels)),
            -jnp.exp(jax.random.normal(k[2], decay)),
            jax.random.normal(k[3], (1, t, 3)).astype(jnp.bfloat16),
            jax.random.normal(k[4], (1, t, 3)).astype(jnp.bfloat16),
            jax.random.normal(k[5], state))


@pytest.mark.parametrize("kernel", [pytest.param("memory_attention", marks=pytest.mark.slow),
                                    pytest.param("ssd", marks=pytest.mark.slow),
                                    "selective_scan"])  # interpret mode: 11, 8, 4 s CPU
def test_pallas_kernels_in_bfloat16(kernel):
    """Each Pallas kernel on bfloat16 inputs (interpret mode on CPU) against the reference on the
    same inputs: outputs and the VJP of a random cotangent, within KERNEL_TOL of the largest
    value; outputs and gradients keep the documented dtypes."""
    if kernel == "memory_attention":
        args, options = _attention_inputs()

        def run(implementation):
            return lambda q, k, v, kf, vf: ops.memory_attention(
                q, k, v, k_fading=kf, v_fading=vf, implementation=implementation, **options)
    else:
        args = _scan_inputs(kernel)
        op = getattr(ops, kernel)

        def run(implementation):
            return lambda *a: op(*a, chunk_size=8, implementation=implementation)

    def check(actual, expected, grad):
        helpers.assert_close_to_scale(actual, expected, KERNEL_TOL)

    out, grads = helpers.assert_vjp_matches(run("pallas"), run("reference"), args, check)
    out = jax.tree.leaves(out)
    assert out[0].dtype == (jnp.float32 if kernel == "memory_attention" else jnp.bfloat16)
    assert [g.dtype for g in grads] == [a.dtype for a in args]
