"""Sharded training, sequence parallelism, checkpoints across mesh shapes, multi-host training.

The multi-device checks run in subprocesses with 8 simulated CPU devices
(`tests/sharding_checks.py`, one subprocess per test; this process keeps its single device). The
multi-host test starts two `experiments.train` processes of 4 simulated devices each, joined by
`jax.distributed` (gloo collectives on CPU), and compares them with the same run in this process.
The rest are fast in-process checks of the rules and the error messages.
"""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from bmojo_jax import LanguageModel, ModelConfig, sharding, training
from bmojo_jax.sequence_parallel import check_sequence_parallel, sequence_parallel_forward
from experiments.configs import tiny

ROOT = Path(__file__).resolve().parents[1]
MESH = AbstractMesh((2, 2, 2, 1), sharding.MESH_AXES)


def _env(devices: int, **extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)
    env.pop("JAX_PLATFORMS", None)
    return env


def _run_checks(case: str) -> str:
    result = subprocess.run([sys.executable, "-m", "tests.sharding_checks", case], cwd=ROOT,
                            env=_env(8), capture_output=True, text=True, timeout=600)
    lines = [line for line in (result.stdout + result.stderr).splitlines()
             if "Involuntary full rematerialization" not in line]
    output = "\n".join(lines)
    assert result.returncode == 0, output[-4000:]
    assert f"done {case}" in result.stdout, output[-4000:]
    return result.stdout


# --------------------------------------------------------------------------------------------------
# 8 simulated devices (subprocesses)
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sharded_train_step_matches_one_device():
    """(data 2, fsdp 2, tensor 2): the same loss, parameters and optimizer state after two steps as
    on one device, for bmojo and mamba (tolerance 1e-5)."""
    out = _run_checks("train_step")
    for preset in ("bmojo", "mamba"):
        for what in ("loss", "params", "opt state"):
            assert f"ok   {preset} train step: {what}" in out


@pytest.mark.slow
def test_sequence_parallel_forward_matches_unsharded():
    """Time over 4 devices (4 chunks of 4 tokens per shard) and batch over 2: the logits and the
    innovation loss of the unsharded forward, for bmojo (score eviction), bmojo_f, mamba, swa."""
    out = _run_checks("sequence_parallel")
    for preset in ("bmojo", "bmojo_f", "mamba", "swa"):
        assert f"ok   {preset} sequence-parallel logits" in out
    assert "ok   clear error" in out


@pytest.mark.slow
def test_checkpoint_saved_sharded_restores_on_other_meshes():
    """Saved on (2, 2, 2), restored on (8, 1, 1) and on one device: identical arrays, and two
    more steps reach the uninterrupted run's parameters."""
    out = _run_checks("checkpoint")
    for target in ("(8, 1, 1)", "one device (no mesh)"):
        assert f"ok   restored on {target}" in out
        assert f"ok   continued on {target}: params" in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _train_lines(workdir: Path):
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["split"], r["loss"]) for r in lines]


@pytest.mark.slow
def test_multi_host_training_matches_one_process(tmp_path):
    """Two processes x 4 devices, mesh (2, 2, 2), `--config.distributed=True` (the README
    commands): the metrics of the same run in one single-device process."""
    flags = ["--config=experiments/configs/tiny.py:bmojo", "--config.model.n_layers=1",
             "--config.num_steps=2", "--config.optimizer.warmup_steps=1", "--config.log_every=1",
             "--config.checkpoint_every=2"]
    workdir = tmp_path / "multi"
    port = _free_port()
    processes = [subprocess.Popen(
        [sys.executable, "-m", "experiments.train", f"--workdir={workdir}", *flags,
         "--config.mesh_shape=(2,2,2)", "--config.distributed=True"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=_env(4, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                 JAX_PROCESS_ID=str(i))) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    for p, out in zip(processes, outputs):
        assert p.returncode == 0, out[-4000:]

    config = tiny.get_config("bmojo")
    config.model.n_layers = 1
    config.optimizer.warmup_steps = 1
    config.update(num_steps=2, log_every=1, checkpoint_every=2)
    training.train_and_evaluate(config, tmp_path / "single")
    multi, single = _train_lines(workdir), _train_lines(tmp_path / "single")
    assert [line[:2] for line in multi] == [line[:2] for line in single]
    np.testing.assert_allclose([line[2] for line in multi], [line[2] for line in single],
                               rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# In-process: rules, shapes, errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, shape, spec", [
    ("blocks/0/mixer/wq/kernel", (32, 32), P("fsdp", "tensor")),
    ("1/0/mu/blocks/0/mixer/wq/kernel", (32, 32), P("fsdp", "tensor")),  # optimizer state
    ("blocks/0/mixer/wo/kernel", (32, 32), P("tensor", "fsdp")),
    ("blocks/1/mixer/fading/out_proj/kernel", (32, 32), P("tensor", "fsdp")),
    ("blocks/1/mixer/fading/in_proj/kernel", (32, 82), P("fsdp")),
    ("blocks/1/mixer/A_log", (64, 8), P("tensor")),  # mamba1: [inner, n]
    ("blocks/1/mixer/D", (64,), P("tensor")),
    ("blocks/1/mlp/down/kernel", (88, 32), P("tensor", "fsdp")),
    ("embed/embedding", (63, 32), P(None, "fsdp")),  # odd vocabulary: that dim replicated
    ("blocks/0/mixer_norm/scale", (32,), P()),
    ("blocks/0/something/new", (4, 4), P()),  # unmatched: replicated
])
def test_param_rules(path, shape, spec):
    assert sharding.spec_for(path, shape, MESH) == spec


def test_every_model_parameter_has_a_rule():
    """Each parameter of every preset matches a rule (none falls through to the default)."""
    for preset in ("bmojo", "hybrid", "mamba"):
        for kind in ("mamba2", "mamba1"):
            config = ModelConfig.preset(preset, vocab_size=64, d_model=32, n_heads=2,
                                        ssm_head_dim=16, ssm_kind=kind, tie_embeddings=False,
                                        tie_fading_kv=False)
            params = nnx.state(nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0))),
                               nnx.Param)
            for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
                name = sharding.path_string(path)
                assert any(re.search(p, name) for p, _ in sharding.PARAM_RULES), name


def test_mesh_shape_resolution_and_errors():
    assert sharding.resolve_mesh_shape(None, 8) == (8, 1, 1, 1)
    assert sharding.resolve_mesh_shape((-1, 2, 2), 8) == (2, 2, 2, 1)
    assert sharding.resolve_mesh_shape((2, 2, 2), None) == (2, 2, 2, 1)
    assert sharding.resolve_mesh_shape((2, 1, 1, -1), 8) == (2, 1, 1, 4)
    for bad, match in (((2, 2), "three or four integers"), ((1, 1, 1, 1, 1), "three or four"), ((-1, -1, 2), "at most one -1"),
                       ((0, 1, 1), ">= 1"), ((2, 2, 2), "needs 8 devices; there are 4"),
                       
                       ((-1, 3, 1), "not divisible")):
        with pytest.raises(ValueError, match=match):
            sharding.resolve_mesh_shape(bad, 4)
    assert sharding.make_mesh().shape == {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1}
    with pytest.raises(ValueError, match="divisible by the mesh's batch axes data \\* fsdp = 4"):
        sharding.batch_sharding(MESH, 6)


def test_config_fields_are_validated():
    config = tiny.get_config("bmojo")
    assert tuple(config.mesh_shape) == (-1, 1, 1) and config.distributed is False
    config.mesh_shape = (2, 2)
    with pytest.raises(ValueError, match="config.mesh_shape"):
        training.validate_config(config)


def test_one_device_batch_and_rows():
    mesh = sharding.make_mesh()
    assert sharding.process_rows(mesh, 4) == slice(0, 4)
    inputs = np.arange(12, dtype=np.int32).reshape(4, 3)
    (placed,) = sharding.host_batch([inputs], mesh)
    np.testing.assert_array_equal(np.asarray(placed), inputs)


def test_sequence_parallel_validation():
    config = ModelConfig.preset("bmojo_f", vocab_size=64, d_model=32, n_heads=2, window=8,
                                ssm_head_dim=16)
    model = nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0)))
    assert check_sequence_parallel(model, 64, 4) == 16
    with pytest.raises(ValueError, match="not a multiple of the window"):
        check_sequence_parallel(model, 48, 4)
    with pytest.raises(ValueError, match="not divisible by the 4 shards"):
        check_sequence_parallel(model, 50, 4)
    mesh = jax.make_mesh((1,), ("seq",))
    with pytest.raises(ValueError, match="not a mesh axis"):
        sequence_parallel_forward(model, np.zeros((1, 16), np.int32), mesh, "time")


def test_sequence_parallel_on_one_device_is_the_forward():
    """A one-shard mesh: the shard_map path (halo exchanges of zeros, no carried state) reproduces
    the forward exactly in this process."""
    model = LanguageModel(ModelConfig.preset("bmojo", vocab_size=64, d_model=32, n_heads=2,
                                             window=4, chunk_size=4, ssm_head_dim=16, n_layers=1,
                                             eidetic_per_chunk=2, eidetic_slots=4),
                          rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
    mesh = jax.make_mesh((1,), ("seq",))  # Explicit axes (the jax default): resharded inside
    graphdef, state = nnx.split(model)
    expected, expected_aux = jax.jit(lambda s, t: nnx.merge(graphdef, s).forward(t))(state, tokens)
    logits, aux = jax.jit(lambda s, t: sequence_parallel_forward(
        nnx.merge(graphdef, s), t, mesh, "seq", with_aux=True))(state, tokens)
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    np.testing.assert_allclose(aux, expected_aux, rtol=1e-5)


def test_default_config_has_the_fields():
    config = training.default_config()
    assert isinstance(config, ml_collections.ConfigDict)
    assert "mesh_shape" in config and "distributed" in config
