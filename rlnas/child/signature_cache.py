"""Executables cached by a hashable signature, compiled ahead in background threads.

The layer-wise child engine (rlnas/child/layerwise.py) runs a child as a chain
of small jitted functions and wants each distinct one compiled once per search,
as early as possible and off the training thread. This cache provides that:

- `call(key, make_fn, *args)` runs the executable of `key` on args, lowering
  `make_fn()` for args' shapes and compiling it on a miss;
- inside `abstract()`, `call` returns the outputs' shapes
  (`jax.ShapeDtypeStruct`s) instead of running, and leaves the compilation
  running in the pool: running the engine's training step on shapes inside
  `abstract()` compiles everything the step needs without touching data;
- `in_background(fn, *args)` runs such an abstract pass in the lowering
  thread, so that tracing also leaves the training thread.

Each key is lowered once (by whichever thread needs it first) and compiled once
(in the pool); a concrete `call` blocks only if its executable is not ready.
Keys must determine the computation: the function made by `make_fn` and the
shapes and dtypes of its arguments.
"""

import concurrent.futures
import contextlib
import os
import threading
import time
from typing import Any, Callable, Hashable, Optional

import jax


class _Entry:
  """A key's lowering, then its compiled executable (futures)."""

  def __init__(self):
    self.lowered = concurrent.futures.Future()
    self.executable = concurrent.futures.Future()


class SignatureCache:
  """Compiled executables by key; lowering and compilation can run ahead.

  Attributes:
    compile_seconds: thread-seconds spent in XLA compilation, all threads.
    num_compiled: executables compiled so far, by kind (the key's first item).
  """

  def __init__(self, compile_threads: Optional[int] = None):
    self._pool = concurrent.futures.ThreadPoolExecutor(
        compile_threads or os.cpu_count() or 1, thread_name_prefix="xla_compile")
    self._lowerer = concurrent.futures.ThreadPoolExecutor(
        1, thread_name_prefix="xla_lower")
    self._lock = threading.Lock()
    self._local = threading.local()  # Per thread: .abstract, .wait.
    self._entries: dict[Hashable, _Entry] = {}
    self._ready: dict[Hashable, Any] = {}
    self.compile_seconds = 0.0
    self.num_compiled: dict[str, int] = {}

  @property
  def is_abstract(self) -> bool:
    """Whether `call` returns shapes in this thread (inside `abstract()`)."""
    return getattr(self._local, "abstract", False)

  @property
  def wait_seconds(self) -> float:
    """Seconds this thread has spent lowering or blocked on compilation."""
    return getattr(self._local, "wait", 0.0)

  @contextlib.contextmanager
  def abstract(self):
    """Within it, `call` lowers, starts compiling and returns output shapes."""
    self._local.abstract = True
    try:
      yield
    finally:
      self._local.abstract = False

  def in_background(self, fn: Callable, *args) -> concurrent.futures.Future:
    """Runs fn(*args) in the lowering thread (typically an abstract pass)."""
    return self._lowerer.submit(fn, *args)

  def wait_all(self) -> None:
    """Blocks until every executable lowered so far is compiled."""
    with self._lock:
      futures = [e.executable for e in self._entries.values()]
    concurrent.futures.wait(futures)

  def _compile(self, key: tuple, lowered, future: concurrent.futures.Future):
    start = time.perf_counter()
    try:
      executable = lowered.compile()
    except BaseException as e:  # pylint: disable=broad-except
      future.set_exception(e)
      return
    with self._lock:
      self.compile_seconds += time.perf_counter() - start
      self.num_compiled[key[0]] = self.num_compiled.get(key[0], 0) + 1
    future.set_result(executable)

  def call(self, key: tuple, make_fn: Callable[[], Callable], *args):
    """Runs the executable of `key` on args (in `abstract()`: output shapes).

    Args:
      key: hashable; key[0] names the kind (for `num_compiled`).
      make_fn: returns the function to jit; called only on a miss.
      *args: arrays or ShapeDtypeStructs (abstract mode only).
    """
    executable = self._ready.get(key)
    if executable is None:
      start = time.perf_counter()
      with self._lock:
        entry = self._entries.get(key)
        owner = entry is None
        if owner:
          entry = self._entries[key] = _Entry()
      if owner:
        try:
          lowered = jax.jit(make_fn()).lower(*args)
        except BaseException as e:
          with self._lock:
            del self._entries[key]
          entry.lowered.set_exception(e)
          entry.executable.set_exception(e)
          raise
        entry.lowered.set_result(lowered)
        self._pool.submit(self._compile, key, lowered, entry.executable)
      if self.is_abstract:
        result = entry.lowered.result().out_info
      else:
        executable = self._ready[key] = entry.executable.result()
      self._local.wait = self.wait_seconds + time.perf_counter() - start
      if self.is_abstract:
        return result
    if self.is_abstract:
      return executable.out_info
    return executable(*args)
