"""Shared by every test suite of the repository (tests/ and the op suites next to the ops).

One persistent JAX compilation cache per test run (our choice, for the suite's time): many tests
build the same tiny models in new jitted closures, which XLA would compile again; with the cache,
a program compiled once in this run (by either pytest-xdist worker, or by a command a test
launches) is loaded instead. The cache lives in a new temporary directory that the run deletes at
its end, so no run reuses another's compilations. A JAX_COMPILATION_CACHE_DIR set by the caller is
used as it is and kept.
"""

import os
import shutil
import tempfile

_OWNED = "BMOJO_TEST_JAX_CACHE"  # set by the process that created the directory (xdist's controller)

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="bmojo_test_jax_cache_")
    os.environ[_OWNED] = str(os.getpid())
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


def pytest_unconfigure(config):
    del config
    if os.environ.get(_OWNED) == str(os.getpid()):  # the workers inherit the directory, not this
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
