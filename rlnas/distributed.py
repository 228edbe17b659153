"""One search over many processes and devices, through JAX's multi-process runtime.

    process 0                              process 1 .. P-1
    reads the workdir ──state, loop──────> (never touches the workdir)
    tokens = propose(state, step)          tokens = propose(state, step)   same key, same state
        │                                      │
        └── children 0..M-1: one shared queue; every local device of every
            process takes the next child when it is free
                                   │
    results gathered in child order on every process ──> the same controller update everywhere
    writes history, best.json, TensorBoard and checkpoints

This module holds the runtime (`initialize`) and the bounded collectives
(`Group`); rlnas.workers spreads a step's children over the workers.

Zoph & Le 2017 (sec. 3.2 and 4.1) trained 800 children at once with a parameter
server and 100 controller replicas. Here the controller is tiny, so every
process keeps a replica and applies the identical update; architectures are
sampled from the replicated controller with the same `fold_in(seed, step)`
key, and each child's key depends on its id only (`evaluators.child_rng`),
so a search gives the same history on 1 process as on N (apart from the
columns that say who evaluated a child and how long it took).

Results travel through the key-value store of JAX's coordination service
(`jax.distributed.initialize` starts it on process 0), not through device
collectives (`multihost_utils.process_allgather`), because:
- every wait is bounded: a read takes a timeout, and between reads a waiting
  process checks whether a peer has reported a failure; a device collective
  blocks inside XLA with no timeout;
- a result is a small JSON record of any length, with no padding to a common
  shape and no XLA program competing with the children for the devices; the
  same code runs on CPU (no gloo needed), GPU and TPU;
- each child's result is published the moment it is done, so process 0 appends
  it to the history as soon as it and every child before it are done.
It costs about 0.1 ms per store call on localhost (measured: bench/scaleout.md).

Failures:
- A child that raises is a failed child (`config.search.failure_reward`).
- A process that dies (killed, out of memory, lost host) stops sending JAX
  heartbeats; JAX's runtime then terminates every other process within
  `heartbeat_timeout_seconds` ("Terminating process because the JAX
  distributed service detected fatal errors ... another task died"). If
  process 0 dies, the others lose the coordinator and stop at once.
- A process that fails with a Python error first tells the others
  (`abort_peers_on_error`); they stop within a second with `PeerFailed`
  naming it.
- A process that is alive but stuck (a hung child) makes the others give up
  after `collective_timeout_seconds` with `DistributedError`.
- SIGTERM/SIGINT on any process stops every process at the same child: the
  stop is published, the other workers see it within a second, and all raise
  `evaluators.Interrupted` together.
"""

import contextlib
import hashlib
import itertools
import json
import threading
import time
from typing import Any, Callable, Iterator

from absl import logging
import flax.serialization
import jax
import ml_collections


# Defaults of the config.distributed fields read here (a config without them
# gets these). The first three are passed to jax.distributed.initialize; the
# heartbeat and initialization values are JAX's own defaults (jax 0.10.2,
# jax/_src/distributed.py); JAX's shutdown default (300 s) is longer than a
# clean exit needs.
DEFAULTS = {
    "heartbeat_timeout_seconds": 100,
    "initialization_timeout_seconds": 300,
    "shutdown_timeout_seconds": 60,
    # Longest wait for a peer (a child's result, a step boundary) before the
    # job is declared stuck: must exceed the longest child's training time.
    "collective_timeout_seconds": 3600,
    # Children trained at once on each local device (threads); 0 = what the
    # evaluator suggests (`children_at_once`), else 1.
    "children_per_device": 0,
}

_ROOT = "rlnas"
_ABORT_KEY = f"{_ROOT}/abort"
_POLL_SECONDS = 0.5        # how often a waiting process checks for a peer's failure


class DistributedError(RuntimeError):
  """The processes of a job cannot go on together; the message says why."""


class PeerFailed(DistributedError):
  """Another process of the job failed and said so."""


def setting(cfg: ml_collections.ConfigDict | None, name: str) -> Any:
  """config.distributed.<name>, or its default."""
  if cfg is None or name not in cfg:
    return DEFAULTS[name]
  return cfg[name]


def initialize(cfg: ml_collections.ConfigDict | None) -> bool:
  """Starts JAX's multi-process runtime when `config.distributed` asks for it.

  Call it before anything touches a JAX device. With `coordinator_address`
  set it joins that coordinator as `process_id` of `num_processes`; with
  `enabled` alone, JAX finds its peers (TPU VMs, SLURM, Open MPI).

  Returns:
    Whether the runtime was started.
  """
  if cfg is None or not (cfg.get("coordinator_address") or cfg.get("enabled")):
    return False
  timeouts = {
      "initialization_timeout": int(setting(cfg, "initialization_timeout_seconds")),
      "heartbeat_timeout_seconds": int(setting(cfg, "heartbeat_timeout_seconds")),
      "shutdown_timeout_seconds": int(setting(cfg, "shutdown_timeout_seconds")),
  }
  if cfg.get("coordinator_address"):
    jax.distributed.initialize(coordinator_address=cfg.coordinator_address,
                               num_processes=int(cfg.num_processes),
                               process_id=int(cfg.process_id), **timeouts)
  else:
    jax.distributed.initialize(**timeouts)
  logging.info("JAX distributed runtime: process %d of %d; a process that dies "
               "stops the others within %d s (heartbeat timeout)",
               jax.process_index(), jax.process_count(),
               timeouts["heartbeat_timeout_seconds"])
  return True


# ---------------------------------------------------------------------------
# Key-value stores: JAX's coordination service, or a dict for one process.


class _LocalStore:
  """The store of a one-process job: a dict and a condition variable."""

  def __init__(self):
    self._data: dict[str, bytes] = {}
    self._cond = threading.Condition()

  def put(self, key: str, value: bytes, overwrite: bool = False) -> bool:
    with self._cond:
      if key in self._data and not overwrite:
        return False
      self._data[key] = value
      self._cond.notify_all()
      return True

  def get(self, key: str, timeout_s: float) -> bytes | None:
    with self._cond:
      self._cond.wait_for(lambda: key in self._data, timeout=timeout_s)
      return self._data.get(key)

  def peek(self, key: str) -> bytes | None:
    with self._cond:
      return self._data.get(key)

  def increment(self, key: str) -> int:
    with self._cond:
      value = int(self._data.get(key, b"0")) + 1
      self._data[key] = str(value).encode()
      return value

  def delete(self, prefix: str) -> None:
    with self._cond:
      for key in [k for k in self._data if k == prefix or k.startswith(prefix + "/")]:
        del self._data[key]


class _JaxStore:
  """The key-value store of JAX's coordination service (lives on process 0)."""

  def __init__(self, client):
    self._client = client

  @staticmethod
  def _lost(e: Exception) -> DistributedError:
    return DistributedError(
        f"lost the JAX coordination service ({str(e).splitlines()[0][:200]}); "
        "process 0, which runs it, probably died: see its log")

  def put(self, key: str, value: bytes, overwrite: bool = False) -> bool:
    try:
      self._client.key_value_set_bytes(key, value, allow_overwrite=overwrite)
    except jax.errors.JaxRuntimeError as e:
      if "ALREADY_EXISTS" in str(e):
        return False
      raise self._lost(e) from e
    return True

  def get(self, key: str, timeout_s: float) -> bytes | None:
    try:
      return self._client.blocking_key_value_get_bytes(
          key, max(1, int(timeout_s * 1000)))
    except jax.errors.JaxRuntimeError as e:
      if "DEADLINE_EXCEEDED" in str(e):
        return None
      raise self._lost(e) from e

  def peek(self, key: str) -> bytes | None:
    try:
      return self._client.key_value_try_get_bytes(key)
    except jax.errors.JaxRuntimeError as e:
      if "NOT_FOUND" in str(e):
        return None
      raise self._lost(e) from e

  def increment(self, key: str) -> int:
    try:
      return int(self._client.key_value_increment(key, 1))
    except jax.errors.JaxRuntimeError as e:
      raise self._lost(e) from e

  def delete(self, prefix: str) -> None:
    try:
      self._client.key_value_delete(prefix)  # the key and everything under it
    except jax.errors.JaxRuntimeError as e:
      raise self._lost(e) from e


_LOCAL_STORE = _LocalStore()
# Collectives are named by a per-process sequence number: every process calls
# the same collectives in the same order (they run the same search), so the
# numbers agree without talking.
_SEQUENCE = itertools.count()
_OPEN: list[str] = []      # prefixes begun, oldest first, not yet deleted
_OPEN_LOCK = threading.Lock()


def _store(process_count: int):
  if process_count == 1:
    return _LOCAL_STORE
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  client = jax_distributed.global_state.client
  if client is None:
    raise DistributedError(
        f"jax.process_count() is {process_count} but this process did not start "
        "JAX's distributed runtime through rlnas.distributed.initialize")
  return _JaxStore(client)


# ---------------------------------------------------------------------------
# The processes of a job and the few collectives the search needs.


class Group:
  """This process's place in the job, and bounded collectives over the KV store.

  Every process must call the same collectives in the same order. With one
  process every collective returns at once and nothing is sent.
  """

  def __init__(self, cfg: ml_collections.ConfigDict | None = None):
    self.process_index = jax.process_index()
    self.process_count = jax.process_count()
    self.is_primary = self.process_index == 0
    self.timeout_s = float(setting(cfg, "collective_timeout_seconds"))
    self._store = _store(self.process_count)

  # -- building blocks, also used by DistributedEvaluator.

  def begin(self, name: str) -> str:
    """A fresh key prefix for one collective."""
    with _OPEN_LOCK:
      prefix = f"{_ROOT}/{next(_SEQUENCE)}_{name}"
      _OPEN.append(prefix)
    return prefix

  def put(self, key: str, value: bytes) -> bool:
    return self._store.put(key, value)

  def peek(self, key: str) -> bytes | None:
    return self._store.peek(key)

  def increment(self, key: str) -> int:
    return self._store.increment(key)

  def aborted(self) -> bool:
    return self.process_count > 1 and self._store.peek(_ABORT_KEY) is not None

  def raise_if_aborted(self) -> None:
    if self.process_count == 1:
      return
    value = self._store.peek(_ABORT_KEY)
    if value is not None:
      peer = json.loads(value)
      raise PeerFailed(
          f"process {peer['process']} of {self.process_count} failed: "
          f"{peer['message']}. This process (process {self.process_index}) stops "
          "too; fix the cause and run the same command again to resume.")

  def abort(self, message: str) -> None:
    """Tells every other process that this one is failing (first report wins)."""
    if self.process_count > 1:
      self._store.put(_ABORT_KEY, json.dumps(
          {"process": self.process_index, "message": message[:2000]}).encode())

  def wait(self, key: str, what: str, check: Callable[[], None] | None = None) -> bytes:
    """The value of `key` once some process has set it.

    Raises:
      PeerFailed: another process reported a failure while we waited.
      DistributedError: nothing came within the collective timeout.
    """
    deadline = time.monotonic() + self.timeout_s
    while True:
      value = self._store.get(key, min(_POLL_SECONDS, self.timeout_s))
      if value is not None:
        return value
      self.raise_if_aborted()
      if check is not None:
        check()
      if time.monotonic() >= deadline:
        raise DistributedError(
            f"process {self.process_index} waited {self.timeout_s:.0f} s for {what} "
            "and got nothing. A process that died would have stopped the job "
            "through JAX's heartbeat, so one is alive but stuck (see the logs of "
            "the other processes). If children legitimately take longer, raise "
            "config.distributed.collective_timeout_seconds.")

  def end(self, prefix: str) -> None:
    """This process is done with collective `prefix`.

    With one process its keys go now; otherwise process 0 deletes them once
    every process has passed a later all_gather (then all have read them).
    """
    if self.process_count == 1:
      with _OPEN_LOCK:
        if prefix in _OPEN:
          _OPEN.remove(prefix)
      self._store.delete(prefix)

  def _finished(self, prefix: str) -> None:
    """All processes passed collective `prefix`: the ones before it are read."""
    with _OPEN_LOCK:
      if prefix not in _OPEN:
        return
      done, _OPEN[:] = _OPEN[:_OPEN.index(prefix)], _OPEN[_OPEN.index(prefix):]
    if self.is_primary:
      for old in done:
        self._store.delete(old)

  # -- collectives.

  def all_gather(self, name: str, payload: bytes) -> list[bytes]:
    """Every process's payload, in process order. Also a barrier."""
    if self.process_count == 1:
      return [payload]
    prefix = self.begin(name)
    self._store.put(f"{prefix}/{self.process_index}", payload)
    out = [self.wait(f"{prefix}/{p}", f"process {p} to reach '{name}'")
           for p in range(self.process_count)]
    self._finished(prefix)
    return out

  def broadcast(self, name: str, payload: bytes | None) -> bytes:
    """Process 0's payload on every process (others pass anything)."""
    if self.process_count == 1:
      return payload
    prefix = self.begin(name)
    if self.is_primary:
      self._store.put(f"{prefix}/value", payload)
      return payload
    return self.wait(f"{prefix}/value", f"process 0 to send '{name}'")

  def all_gather_json(self, name: str, obj: Any) -> list[Any]:
    return [json.loads(b) for b in self.all_gather(name, json.dumps(obj).encode())]

  def broadcast_json(self, name: str, obj: Any) -> Any:
    if self.process_count == 1:
      return obj
    return json.loads(self.broadcast(name, json.dumps(obj).encode()
                                     if self.is_primary else None))

  def agree(self, name: str, value: Any) -> Any:
    """The first non-None `value` in process order (JSON), the same everywhere.

    E.g. the search's stop reason: process 0's budget check, or a signal that
    reached any process.
    """
    if self.process_count == 1:
      return value
    return next((v for v in self.all_gather_json(name, value) if v is not None), None)

  def from_primary(self, state: Any, loop: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Process 0's search state and loop counters, on every process.

    Args:
      state: a strategy state pytree; on other processes, the template
        (`strategy.init_state()`) it is restored into.
      loop: the search loop's counters (JSON numbers).
    """
    if self.process_count == 1:
      return state, loop
    blob = self.broadcast("state", _state_bytes(state) if self.is_primary else None)
    loop = self.broadcast_json("loop", loop)
    # Process 0 takes the round trip too, so every replica holds the same
    # array types (numpy leaves, no weak types) from here on.
    return flax.serialization.from_bytes(state, blob), loop

  def sync_state(self, state: Any, step: int) -> Any:
    """Checks that every controller replica holds the same state.

    The update is deterministic on one platform, so the replicas agree; if
    they ever do not (a non-deterministic GPU kernel), every process adopts
    process 0's state, so they sample the same architectures again.
    """
    if self.process_count == 1:
      return state
    blob = _state_bytes(state)
    digests = self.all_gather("state_digest", hashlib.sha256(blob).digest())
    if len(set(digests)) == 1:
      return state
    logging.warning("controller replicas differ after step %d; every process "
                    "takes process 0's", step)
    blob = self.broadcast("state_repair", blob if self.is_primary else None)
    return flax.serialization.from_bytes(state, blob)


def _state_bytes(state: Any) -> bytes:
  return flax.serialization.to_bytes(jax.device_get(state))


def group(cfg: ml_collections.ConfigDict | None = None) -> Group:
  """This process's Group; `cfg` is `config.distributed` (timeouts)."""
  return Group(cfg)


@contextlib.contextmanager
def abort_peers_on_error() -> Iterator[None]:
  """Tells the other processes when this one leaves with an exception.

  Without it they would wait for this process until the collective timeout;
  with it they raise PeerFailed within a second. Stops (KeyboardInterrupt)
  count too: a process that leaves early leaves the others waiting.
  """
  try:
    yield
  except BaseException as e:
    if not isinstance(e, PeerFailed):
      try:
        Group().abort(f"{type(e).__name__}: {e}")
      except Exception:  # pylint: disable=broad-except
        pass  # No runtime, or the coordinator itself is gone (JAX stops the others).
    raise
