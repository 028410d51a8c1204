"""Settings for the whole test session: tests/ and the op suites next to the ops
(bmojo_jax/ops/<op>/<op>_test.py), and the subprocesses they start (they inherit the environment).

XLA:CPU compiles with LLVM at -O0 (`--xla_backend_optimization_level=0`, our choice): the tests run
tiny shapes, where compiling dominates (about a quarter less CPU time for the suite), and the
optimisation level does not change the operations XLA computes, only how fast the machine code
runs. Set XLA_FLAGS yourself to test with other flags: an explicit level is kept.
"""

import os

if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_backend_optimization_level=0").strip()
