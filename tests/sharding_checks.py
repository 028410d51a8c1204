"""Multi-device checks run in a subprocess with 8 simulated CPU devices (tests/test_sharding.py).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.sharding_checks CASE

CASE is one of `CASES`; each prints one line per check and exits non-zero on the first failure.
The main pytest process keeps its single device; the device count is fixed when JAX starts, hence
the subprocess.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bmojo_jax import LanguageModel, ModelConfig, sharding, training  # noqa: E402
from bmojo_jax.sequence_parallel import sequence_parallel_forward  # noqa: E402
from tests import helpers  # noqa: E402

TINY = dict(vocab_size=64, d_model=32, n_layers=1, n_heads=2, window=4, chunk_size=4, d_state=8,
            ssm_head_dim=16)
EIDETIC = dict(eidetic_per_chunk=2, eidetic_slots=4)
BATCH, SEQ = 4, 32


def _max_diff(a, b) -> float:
    a, b = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    assert len(a) == len(b), (len(a), len(b))
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(a, b))


def _check(name: str, error: float, tolerance: float) -> None:
    ok = error <= tolerance
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max |diff| {error:.3g} (tolerance {tolerance:g})",
          flush=True)
    if not ok:
        sys.exit(f"{name}: difference {error:.3g} exceeds {tolerance:g}")


def _train_config(preset: str, batch_size: int = BATCH):
    config = training.default_config(preset)
    config.optimizer.update(lr=1e-2, warmup_steps=1)
    config.update(num_steps=10, batch_size=batch_size)
    return config


def _model_config(preset: str, **changes) -> ModelConfig:
    return ModelConfig.preset(preset, **{**TINY, **(EIDETIC if preset == "bmojo" else {}),
                                         **changes})


def _batch(step: int, batch_size: int = BATCH):
    rng = np.random.default_rng([7, step])
    tokens = rng.integers(0, TINY["vocab_size"], (batch_size, SEQ + 1)).astype(np.int32)
    return tokens[:, :-1], tokens[:, 1:]


def _fresh_state(model_cfg, config):
    """Initial (params, opt_state) as host (numpy) arrays: every placement is a fresh copy, which
    the train steps may donate."""
    params = nnx.state(LanguageModel(model_cfg, rngs=nnx.Rngs(0)), nnx.Param)
    return jax.device_get((params, training.make_optimizer(config).init(params)))


def _run(train_step, params, opt_state, steps, place=None, batch_size=BATCH):
    metrics = []
    for step in steps:
        batch = _batch(step, batch_size)
        batch = batch if place is None else place(batch)
        params, opt_state, m = train_step(params, opt_state, *batch)
        metrics.append(m)
    return params, opt_state, jax.device_get(metrics)


def check_train_step():
    """A (data 2, fsdp 2, tensor 2) train step = the one-device step (loss, params, opt state).
    `bmojo` has every parameter kind of `transformer` (attention, MLP) and more; `mamba` the SSM
    mixer's."""
    mesh = sharding.make_mesh((2, 2, 2))
    one = jax.devices()[0]
    for preset in ("bmojo", "mamba"):
        tic = time.perf_counter()
        model_cfg, config = _model_config(preset), _train_config(preset)
        fresh = _fresh_state(model_cfg, config)
        single = _run(training.make_train_step(model_cfg, config), *jax.device_put(fresh, one),
                      range(2))
        state = sharding.shard_tree(fresh, mesh)
        sharded = _run(training.make_train_step(model_cfg, config, mesh), *state, range(2),
                       place=lambda b: sharding.host_batch(b, mesh))
        params = sharded[0]
        kernel = params["blocks"][0]["mlp"]["gate"]["kernel"][...]
        assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor"), kernel.sharding
        assert kernel.addressable_shards[0].data.shape == (16, kernel.shape[1] // 2)
        _check(f"{preset} train step: loss", _max_diff([m["loss"] for m in single[2]],
                                                       [m["loss"] for m in sharded[2]]), 1e-5)
        _check(f"{preset} train step: params", _max_diff(single[0], sharded[0]), 1e-5)
        _check(f"{preset} train step: opt state", _max_diff(single[1], sharded[1]), 1e-5)
        if preset == "bmojo":  # the sequence-parallel step: once, on the richest model
            _check_sequence_parallel_step(model_cfg, config, fresh, single)
        print(f"     ({time.perf_counter() - tic:.1f} s)", flush=True)


def _check_sequence_parallel_step(model_cfg, config, fresh, single):
    """Sequence parallelism in training: time over 4 devices (8 tokens = 2 windows a shard) =
    the one-device step `single` (loss, params)."""
    mesh = sharding.make_mesh((2, 1, 1, 4))
    split = _run(training.make_train_step(model_cfg, config, mesh),
                 *sharding.shard_tree(fresh, mesh), range(2),
                 place=lambda b: sharding.host_batch(b, mesh))
    _check("sequence-parallel train step: loss",
           _max_diff([m["loss"] for m in single[2]], [m["loss"] for m in split[2]]), 1e-5)
    _check("sequence-parallel train step: params", _max_diff(single[0], split[0]), 1e-5)


def check_sequence_parallel():
    """Time over 4 devices (16 tokens = 4 chunks of 4 per shard) = the unsharded forward."""
    mesh = jax.make_mesh((4, 2), ("seq", "batch"), devices=jax.devices(),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    tokens = jax.random.randint(jax.random.key(1), (2, 64), 0, TINY["vocab_size"])
    # every selection rule ("learned": with the slots' logit bias; "state": its selection reads
    # the gathered tokens) and the oracle's scores
    rules = {f"bmojo-{rule}": changes for rule, changes in helpers.RULES.items()}
    variants = {"transformer": {}, "bmojo": dict(eidetic_eviction="score", eidetic_slots=6),
                **rules, "bmojo-oracle": {}, "bmojo_f": {}, "mamba": {},
                "swa": {}}  # swa last: the validation below
    oracle = jnp.broadcast_to((jnp.arange(tokens.shape[1]) % 24 < 5).astype(jnp.float32),
                              tokens.shape)  # a few tokens of every shard
    for preset, changes in variants.items():
        tic = time.perf_counter()
        model = LanguageModel(_model_config(preset.split("-")[0], **changes), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        scores = oracle if preset.endswith("oracle") else None
        expected, expected_aux = jax.jit(lambda s, t: nnx.merge(graphdef, s).forward(
            t, eidetic_scores=scores))(state, tokens)
        logits, aux = jax.jit(lambda s, t: sequence_parallel_forward(
            nnx.merge(graphdef, s), t, mesh, "seq", batch_axis="batch", with_aux=True,
            eidetic_scores=scores))(state, tokens)
        assert logits.sharding.is_equivalent_to(
            jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch", "seq")), 3)
        _check(f"{preset} sequence-parallel logits", _max_diff(expected, logits), 1e-5)
        _check(f"{preset} sequence-parallel aux loss", _max_diff(expected_aux, aux), 1e-6)
        # The check has teeth: a shard run alone (no carried state, no halo) is far off.
        alone = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens[:, 32:48])
        gap = _max_diff(alone, expected[:, 32:48])
        assert gap > 1e-2, f"{preset}: the third shard does not depend on earlier ones ({gap})"
        print(f"     ({time.perf_counter() - tic:.1f} s; a shard alone is off by {gap:.2g})",
              flush=True)
    try:  # validation: a shard length that is not a multiple of the window
        sequence_parallel_forward(model, tokens[:, :40], mesh, "seq")
    except ValueError as e:
        assert "multiple of the window" in str(e), e
        print(f"ok   clear error: {e}")
    else:
        sys.exit("a shard length of 10 tokens with window 4 was accepted")


def check_checkpoint():
    """Saved on a (2, 2, 2) mesh at step 2; restored on (8, 1, 1) and on one device (plain arrays,
    the unsharded step), two more steps reach the (2, 2, 2) run's step-4 state."""
    preset, batch_size = "bmojo", 8  # 8 rows: (8, 1, 1) splits the batch 8 ways
    model_cfg, config = _model_config(preset), _train_config(preset, batch_size)
    fresh = _fresh_state(model_cfg, config)
    mesh = sharding.make_mesh((2, 2, 2))

    def run_on(mesh, state, steps):
        place = (lambda b: sharding.host_batch(b, mesh)) if mesh is not None else None
        return _run(training.make_train_step(model_cfg, config, mesh), *state, steps, place,
                    batch_size)

    params, opt_state, _ = run_on(mesh, sharding.shard_tree(fresh, mesh), range(2))
    saved = jax.device_get((params, opt_state))
    with tempfile.TemporaryDirectory() as directory:
        with training.Checkpoints(directory) as checkpoints:
            checkpoints.save(2, params, opt_state, {"step": 2})
        expected = run_on(mesh, (params, opt_state), range(2, 4))
        targets = {"(8, 1, 1)": sharding.make_mesh((8, 1, 1)), "one device (no mesh)": None}
        for name, target in targets.items():
            like = (sharding.shard_tree(fresh, target) if target is not None
                    else jax.device_put(fresh, jax.devices()[0]))
            with training.Checkpoints(directory, create=False) as checkpoints:
                meta, params2, opt2 = checkpoints.restore(None, *like)
            assert meta["step"] == 2
            for got, want in zip(jax.tree.leaves((params2, opt2)), jax.tree.leaves(like)):
                assert got.sharding == want.sharding, (got.sharding, want.sharding)
            _check(f"restored on {name}", _max_diff((params2, opt2), saved), 0.0)
            resumed = run_on(target, (params2, opt2), range(2, 4))
            _check(f"continued on {name}: params", _max_diff(expected[0], resumed[0]), 1e-5)
            _check(f"continued on {name}: loss", _max_diff([m["loss"] for m in expected[2]],
                                                           [m["loss"] for m in resumed[2]]), 1e-5)


CASES = {"train_step": check_train_step, "sequence_parallel": check_sequence_parallel,
         "checkpoint": check_checkpoint}


def main(argv):
    if len(argv) != 2 or argv[1] not in CASES:
        sys.exit(f"usage: python -m tests.sharding_checks {{{','.join(CASES)}}}")
    if jax.device_count() != 8:
        sys.exit(f"expected 8 (simulated) devices, got {jax.device_count()}")
    tic = time.perf_counter()
    CASES[argv[1]]()
    print(f"done {argv[1]} in {time.perf_counter() - tic:.1f} s")


if __name__ == "__main__":
    main(sys.argv)
