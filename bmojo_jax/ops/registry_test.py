"""The op registry: named implementations, errors, and lazily imported (Pallas) implementations."""

import json
import pathlib
import subprocess
import sys

import pytest

from bmojo_jax.ops import registry

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Run in a fresh interpreter: prints the Pallas modules loaded after `import bmojo_jax`, after the
# xla scans, cross-entropy, eidetic selection and memory attention (window, fading keys, slots,
# their logit bias and the attention mass; full attention; decoding's attend_one), and after a
# pallas scan. `pallas_kernels` and `pallas_kernels.config` (tiles, MASKED_LOGIT) load no Pallas
# module and are imported first, to check exactly that.
_SCRIPT = """
import json, sys
import pallas_kernels.config
import bmojo_jax
from bmojo_jax import ops
import jax.numpy as jnp

def pallas_modules():
    return sorted(m for m in sys.modules if m.startswith("jax.experimental.pallas")
                  or (m.startswith("pallas_kernels.") and m != "pallas_kernels.config"))

loaded = [pallas_modules()]
x, dt, a, B = jnp.ones((1, 3, 1, 2)), jnp.ones((1, 3, 1)), -jnp.ones(1), jnp.ones((1, 3, 2))
ops.ssd(x, dt, a, B, B, implementation="xla")
ops.selective_scan(x[..., 0], dt, -jnp.ones((1, 2)), B, B, implementation="xla")
ops.linear_cross_entropy(x[:, :, 0], jnp.ones((5, 2)), jnp.zeros((1, 3), int), jnp.ones((1, 3)))
q, scores = ops.rope(jnp.ones((1, 4, 1, 2)), jnp.arange(4)), jnp.arange(4.0)[None]
slots = ops.select_eidetic(scores, window=2, per_chunk=1, slots=1, implementation="xla")
ops.memory_attention(q, q, q, window=2, k_fading=q, v_fading=q, memory_positions=slots,
                     memory_bias=scores, return_mass=True, implementation="xla")
ops.memory_attention(q, q, q, implementation="xla")
ops.attend_one(q[:, 0], q, q, jnp.ones(4, bool))
loaded.append(pallas_modules())
ops.ssd(x, dt, a, B, B, implementation="pallas")
loaded.append(pallas_modules())
print(json.dumps(loaded))
"""


def test_import_loads_no_pallas():
    """`import bmojo_jax` and the xla implementations (scans, cross-entropy, eidetic selection,
    attention) load no Pallas module; asking for implementation="pallas" loads the kernel
    (registry.Lazy)."""
    result = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    after_import, after_xla, after_pallas = json.loads(result.stdout.strip().splitlines()[-1])
    assert after_import == [], f"import bmojo_jax loaded {after_import}"
    assert after_xla == [], f"the xla implementations loaded {after_xla}"
    assert "pallas_kernels.ssd" in after_pallas and "jax.experimental.pallas" in after_pallas


def test_pick():
    implementations = {"xla": len, "lazy": registry.Lazy("json", "dumps")}
    assert registry.pick("op", implementations, "xla") is len
    assert registry.pick("op", implementations, None) is len  # the default on every backend today
    assert registry.pick("op", implementations, "lazy") is json.dumps
    with pytest.raises(ValueError, match=r"op: implementation='nope' .* \['lazy', 'xla'\]"):
        registry.pick("op", implementations, "nope")
