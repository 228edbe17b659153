r"""One convolution layer's step on CPU: XLA (as the layer-wise engine compiles it) vs torch.

Separates the two costs behind bench/child_study.md's throughput numbers:
the convolution kernels themselves (are XLA:CPU's as fast as torch's?) and the
way the engine wraps them (how the backward executable gets its residuals,
where the optimizer update goes). Every timing is synchronous (each call
waits for its result: XLA:CPU otherwise overlaps consecutive calls on
several cores) and is the median of --repeats blocks of --calls calls, all
in one process, so the ratios hold while the machine drifts.

Rows, per layer shape (batch 64 of 8x8 digits-sized feature maps, as in
configs/default.py):
  xla conv fwd+bwd   forward, weight gradient and input gradient, each its
                     own executable (one thread);
  torch fwd+bwd      conv2d forward + autograd of both, one thread and
                     default threads;
and for the engine's backward executable (weight and input gradient + Adam
with L2, as `layerwise.LayerwiseEngine._conv_backward` builds it):
  closure            receives the `jax.vjp` closure the forward returned;
  recompute          receives the inputs and takes the VJP itself;
  recompute+barrier  the same with `optimization_barrier` on the gradients
                     before the optimizer update.
The engine takes the inputs ("recompute"): the three measured the same.

Usage:
  .venv/bin/python bench/conv_kernels.py
Takes about a minute. Needs torch (pip install 'rlnas[bench]').
"""

import os
import statistics
import time

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                      "intra_op_parallelism_threads=1")

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

FLAGS = flags.FLAGS
flags.DEFINE_integer("calls", 30, "calls per timed block")
flags.DEFINE_integer("repeats", 5, "timed blocks per figure (median)")

# (kernel h, kernel w, input depth, filters): the first two are a converged
# default search's layers, then a square 5x5, a 3x3 and a 1x1.
SHAPES = ((5, 3, 32, 32), (5, 3, 64, 32), (5, 5, 32, 32), (3, 3, 32, 32), (1, 1, 64, 32))
BATCH, SIZE = 64, 8


def _median_us(fn) -> float:
  fn()
  blocks = []
  for _ in range(FLAGS.repeats):
    start = time.perf_counter()
    for _ in range(FLAGS.calls):
      fn()
    blocks.append((time.perf_counter() - start) / FLAGS.calls * 1e6)
  return statistics.median(blocks)


def _conv(kernel, x):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _xla_rows(kh, kw, cin, cout, rng):
  x = jnp.asarray(rng.standard_normal((BATCH, SIZE, SIZE, cin)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((kh, kw, cin, cout)) * 0.1, jnp.float32)
  g = jnp.asarray(rng.standard_normal((BATCH, SIZE, SIZE, cout)) * 1e-3, jnp.float32)
  fwd = jax.jit(_conv)
  kgrad = jax.jit(lambda k, x, g: jax.vjp(lambda k: _conv(k, x), k)[1](g)[0])
  xgrad = jax.jit(lambda k, x, g: jax.vjp(lambda x: _conv(k, x), x)[1](g)[0])
  sync = lambda f, *a: lambda: jax.block_until_ready(f(*a))
  conv_us = (_median_us(sync(fwd, k, x)) + _median_us(sync(kgrad, k, x, g))
             + _median_us(sync(xgrad, k, x, g)))

  tx = optax.chain(optax.add_decayed_weights(1e-4), optax.adam(0.01))
  state = tx.init(k)

  def update(grad, state, k, barrier):
    if barrier:
      grad = jax.lax.optimization_barrier(grad)
    updates, state = tx.update(grad, state, k)
    return optax.apply_updates(k, updates), state

  def closure(vjp, g, state, k):
    gk, gx = vjp(g)
    return update(gk, state, k, False) + (gx,)

  def recompute(k, x, g, state, barrier):
    gk, gx = jax.vjp(_conv, k, x)[1](g)
    return update(gk, state, k, barrier) + (gx,)

  _, vjp = jax.jit(lambda k, x: jax.vjp(_conv, k, x))(k, x)
  backward = {
      "closure": sync(jax.jit(closure), vjp, g, state, k),
      "recompute": sync(jax.jit(lambda *a: recompute(*a, False)), k, x, g, state),
      "recompute+barrier": sync(jax.jit(lambda *a: recompute(*a, True)), k, x, g, state),
  }
  return conv_us, {name: _median_us(fn) for name, fn in backward.items()}


def _torch_us(kh, kw, cin, cout, threads: int) -> float:
  import torch
  torch.set_num_threads(threads)
  x = torch.randn(BATCH, cin, SIZE, SIZE, requires_grad=True)
  k = (torch.randn(cout, cin, kh, kw) * 0.1).requires_grad_()
  g = torch.randn(BATCH, cout, SIZE, SIZE) * 1e-3

  def step():
    y = torch.nn.functional.conv2d(x, k, padding=(kh // 2, kw // 2))
    torch.autograd.grad(y, (k, x), g)
  return _median_us(step)


def main(argv):
  del argv
  import torch
  default_threads = torch.get_num_threads()
  rng = np.random.default_rng(0)
  print(f"XLA:CPU one thread; torch {torch.__version__} one and {default_threads} "
        f"threads; batch {BATCH}, {SIZE}x{SIZE} maps; microseconds, median of "
        f"{FLAGS.repeats} blocks of {FLAGS.calls} synchronous calls")
  print("| kernel | xla conv fwd+bwd | torch fwd+bwd, 1 thread | xla / torch (1 thread) "
        f"| torch, {default_threads} threads | engine backward: closure | recompute "
        "| recompute+barrier | barrier / closure |")
  print("|---|---|---|---|---|---|---|---|---|")
  for kh, kw, cin, cout in SHAPES:
    conv_us, backward = _xla_rows(kh, kw, cin, cout, rng)
    torch_1 = _torch_us(kh, kw, cin, cout, 1)
    torch_n = _torch_us(kh, kw, cin, cout, default_threads)
    print(f"| {kh}x{kw} {cin}->{cout} | {conv_us:.0f} | {torch_1:.0f} | "
          f"{conv_us / torch_1:.2f} | {torch_n:.0f} | {backward['closure']:.0f} | "
          f"{backward['recompute']:.0f} | {backward['recompute+barrier']:.0f} | "
          f"{backward['recompute+barrier'] / backward['closure']:.2f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
