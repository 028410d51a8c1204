"""The benchmarks' variant names (`PRESET[/FIELD=VALUE]...`) read as the configs they name; the
op-by-op profile attributes a step's time to the code that emitted it; the kernel benchmark's
check against the reference tells a right result from a wrong one; `interleave_apart` never times
two groups' variants one right after the other."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import harness, op_profile
from benchmarks.train_step import variant_config


def test_variant_config_applies_each_override_and_names_bad_ones():
    mixed = variant_config("bmojo/dtype=bfloat16/remat=block", d_model=64)
    assert (mixed.dtype, mixed.remat, mixed.d_model, mixed.pattern) == ("bfloat16", "block", 64,
                                                                       "B")
    assert variant_config("mamba/d_ff=0").hidden_dim == 0
    assert variant_config("bmojo/state").eidetic_selection == "state"
    assert variant_config("bmojo/eidetic_threshold=0.5").eidetic_threshold == 0.5
    for bad, message in [("bmojo/dtyp=bfloat16", r"'bmojo/dtyp=bfloat16': Unknown ModelConfig"),
                         ("bmojo/dtype=float16", r"dtype='float16': allowed values"),
                         ("bmojo/d_ff=-1", r"d_ff=-1: must be an integer >= 0"),
                         ("mamba2/d_ff=0", r"Unknown preset 'mamba2'")]:
        with pytest.raises(ValueError, match=message):
            variant_config(bad)


def _matmul_then_tanh(a, b):
    return jnp.tanh(a @ b).sum()


def test_op_profile_attributes_time_to_the_emitting_function_and_kind():
    """A traced run of a compiled dot + tanh: every instruction's self time lands on this file's
    function, the dot as "matmul", and the shares add up to one."""
    a = jnp.ones((256, 256), jnp.float32)
    compiled = jax.jit(_matmul_then_tanh).lower(a, a).compile()
    sites = op_profile.instruction_sites(compiled)
    ours = {s.kind for s in sites.values()
            if s.site == "test_benchmarks.py:_matmul_then_tanh"}
    assert "matmul" in ours, sites
    result = op_profile.profile(compiled, lambda: jax.block_until_ready(compiled(a, a)), runs=2)
    assert result["op_seconds"] > 0
    np.testing.assert_allclose(sum(r["share"] for r in result["rows"]), 1.0, rtol=1e-6)
    np.testing.assert_allclose(sum(result["by_kind"].values()), 1.0, rtol=1e-6)
    assert any(r["site"] == "test_benchmarks.py:_matmul_then_tanh" and r["kind"] == "matmul"
               for r in result["rows"]), result["rows"]


def test_matmul_dtypes_shapes_are_read_or_refused_by_name():
    from benchmarks import matmul_dtypes
    assert matmul_dtypes.parse_shape("8192x256x688") == (8192, 256, 688)
    for bad in ("8192x256", "8192x0x2", "axbxc"):
        with pytest.raises(ValueError, match=f"--shapes entry '{bad}'"):
            matmul_dtypes.parse_shape(bad)


def test_kernels_check_measures_the_error_against_the_reference():
    """`benchmarks.kernels`' check: the `xla` selective scan (outputs and gradients) is within the
    float32 tolerance of the reference; a 1% perturbation reads as 1e-2 and fails it; a NaN fails
    any tolerance; a variant that cannot be built is a failed row, not the end of the run."""
    from benchmarks import kernels
    args, call = kernels.make_inputs("selective_scan", dict(b=1, t=16, d=4, n=2), jnp.float32)
    expected = kernels.reference_results(call, args, backward=True)
    tolerance = kernels.TOLERANCE["float32"]
    run, fields = kernels.check_variant(call, args, "xla", True, expected, tolerance)
    assert fields["within_tolerance"] and fields["relative_error"] <= tolerance, fields
    actual = run()
    perturbed = jax.tree.map(lambda a: a * 1.01, expected)
    np.testing.assert_allclose(kernels.relative_error(perturbed, expected), 1e-2, rtol=1e-3)
    broken = jax.tree.map(lambda a: a.at[0].set(jnp.nan), actual)
    assert kernels.relative_error(broken, expected) is None  # never within a tolerance
    assert kernels.relative_error(actual, broken) is None  # a broken reference proves nothing
    run, fields = kernels.check_variant(call, args, "triton", True, expected, tolerance)
    assert run is None and not fields["within_tolerance"], fields
    assert "triton" in fields["failure"], fields  # names the implementation the op lacks


def test_interleave_apart_times_each_group_in_rounds_of_its_own():
    """Every variant of a group is timed once per round before any variant of the next group
    runs; warmup calls included; the timings and failures of every group are merged."""
    calls = []

    def runner(key):
        def run():
            calls.append(key)
            if key == ("decode", 2):
                raise RuntimeError("no decode at 2")
        return run

    keys = [("prefill", 1), ("decode", 1), ("prefill", 2), ("decode", 2)]
    timings = harness.interleave_apart({k: runner(k) for k in keys}, 2, group=lambda k: k[0],
                                       catch=(RuntimeError,))
    prefills, decodes = [("prefill", 1), ("prefill", 2)], [("decode", 1), ("decode", 2)]
    assert calls == prefills * 3 + decodes + [("decode", 1)] * 2  # warmup + 2 rounds each
    assert {k: len(v) for k, v in timings.seconds.items()} == {
        ("prefill", 1): 2, ("prefill", 2): 2, ("decode", 1): 2, ("decode", 2): 0}
    assert timings.failures == {("decode", 2): "RuntimeError: no decode at 2"}
