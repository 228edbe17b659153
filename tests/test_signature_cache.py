"""Tests of rlnas/child/signature_cache.py: compile once per key, ahead of time."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlnas.child import signature_cache


def _square():
  return lambda x: x * x


def test_compiles_once_per_key():
  cache = signature_cache.SignatureCache(compile_threads=2)
  x = jnp.arange(3.0)
  np.testing.assert_allclose(cache.call(("square", 3), _square, x), [0, 1, 4])
  np.testing.assert_allclose(cache.call(("square", 3), _square, x + 1), [1, 4, 9])
  cache.call(("square", 4), _square, jnp.ones(4))
  assert cache.num_compiled == {"square": 2}
  assert cache.compile_seconds > 0


def test_abstract_pass_compiles_ahead_and_returns_shapes():
  cache = signature_cache.SignatureCache()
  x = jax.ShapeDtypeStruct((5,), jnp.float32)

  def chain():  # A two-step computation whose second step needs the first's shape.
    y = cache.call(("square", 5), _square, x)
    return cache.call(("sum",), lambda: jnp.sum, y)

  with cache.abstract():
    out = chain()
  assert isinstance(out, jax.ShapeDtypeStruct) and out.shape == ()
  cache.wait_all()
  assert cache.num_compiled == {"square": 1, "sum": 1}
  waited = cache.wait_seconds
  y = cache.call(("square", 5), _square, jnp.arange(5.0))
  assert float(cache.call(("sum",), lambda: jnp.sum, y)) == 30.0
  assert cache.num_compiled == {"square": 1, "sum": 1}  # Nothing recompiled.
  assert cache.wait_seconds >= waited


def test_background_lowering_runs_off_thread():
  cache = signature_cache.SignatureCache()

  def ahead():
    with cache.abstract():
      return cache.call(("square", 7), _square, jax.ShapeDtypeStruct((7,), jnp.float32))

  assert cache.in_background(ahead).result().shape == (7,)
  cache.wait_all()
  assert cache.num_compiled == {"square": 1}


def test_lowering_errors_propagate_and_are_not_cached():
  cache = signature_cache.SignatureCache()
  bad = lambda: lambda x: x @ x  # [2, 3] @ [2, 3] does not type-check.
  for _ in range(2):
    with pytest.raises(TypeError):
      cache.call(("bad",), bad, jnp.ones((2, 3)))
  assert cache.num_compiled == {}
