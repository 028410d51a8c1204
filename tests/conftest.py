"""Fixtures for the tests under tests/.

pytest applies this file only to tests below tests/; the op suites next to the ops
(bmojo_jax/ops/<op>/<op>_test.py) therefore share plain functions instead, in tests/helpers.py
(PRNG keys, the VJP check against a reference, chex closeness assertions). Test modules never
import each other: what two of them share goes there, or here as a fixture.
"""

import pytest

from tests import helpers


@pytest.fixture
def keys():
    """`keys(n, seed=0)`: n PRNG keys (`tests.helpers.keys`), for tests that draw their own data."""
    return helpers.keys
