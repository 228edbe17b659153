"""What a search writes for people: history.jsonl, best.json, TensorBoard scalars.

- `history.jsonl`: one JSON line per child, appended and flushed (and fsynced)
  as soon as the child is evaluated, so a killed search loses nothing it
  finished. A torn last line (a kill mid-write) is detected and dropped on
  resume; `SearchHistory` replays the lines of an unfinished step.
- `history.discarded.jsonl`: lines a resumed search could not replay (e.g. the
  config changed under `allow_config_change`), kept rather than deleted.
- `best.json`: the best child so far, replaced atomically (write, then rename).
- `tb/`: TensorBoard event files written by tensorboardX (no TensorFlow needed).
"""

import collections
import json
import os
from typing import Any, Iterable

from absl import logging

HISTORY = "history.jsonl"
DISCARDED = "history.discarded.jsonl"
BEST = "best.json"


def _fsync_dir(path: str) -> None:
  """Makes a rename in `path` durable (POSIX; a no-op where unsupported)."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def atomic_write_json(path: str, obj: Any) -> None:
  """Writes JSON to `path` via a temporary file and rename (never half-written)."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  _fsync_dir(os.path.dirname(os.path.abspath(path)))


def read_history(workdir: str) -> list[dict[str, Any]]:
  """Reads history.jsonl; drops (and reports) a torn or corrupt trailing line.

  A corrupt line before the end is not a kill artefact; it raises.
  """
  return load_history(workdir)[0]


def load_history(workdir: str) -> tuple[list[dict[str, Any]], bool]:
  """Like `read_history`, also saying whether a trailing line was dropped.

  When it was, the file must be rewritten (`rewrite_history`) before anything
  is appended to it.
  """
  path = os.path.join(workdir, HISTORY)
  if not os.path.exists(path):
    return [], False
  with open(path) as f:
    lines = f.read().split("\n")
  records = []
  complete = lines[:-1]          # text after the last newline was never finished
  dropped = bool(lines[-1])
  if lines[-1].strip():
    logging.warning("history.jsonl: dropping an unfinished last line (%d bytes), "
                    "left by an interrupted write", len(lines[-1]))
  for i, line in enumerate(complete):
    if not line.strip():
      dropped = True
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if i == len(complete) - 1:
        logging.warning("history.jsonl: dropping a corrupt last line")
        dropped = True
        continue
      raise ValueError(f"{path}: line {i + 1} is not valid JSON; the history is "
                       "damaged beyond a torn last line. Move it away or start "
                       "a new workdir.") from None
  return records, dropped


def rewrite_history(workdir: str, records: Iterable[dict[str, Any]]) -> None:
  """Replaces history.jsonl atomically with `records`."""
  path = os.path.join(workdir, HISTORY)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    for r in records:
      f.write(json.dumps(r, sort_keys=True) + "\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  _fsync_dir(workdir)


def append_discarded(workdir: str, records: Iterable[dict[str, Any]],
                     reason: str) -> None:
  """Appends history lines a search will not use to history.discarded.jsonl."""
  with open(os.path.join(workdir, DISCARDED), "a") as f:
    for r in records:
      f.write(json.dumps({**r, "discarded": reason}, sort_keys=True) + "\n")
    f.flush()
    os.fsync(f.fileno())


class HistoryWriter:
  """Appends one line per child; each line is on disk before the next child."""

  def __init__(self, workdir: str):
    self._file = open(os.path.join(workdir, HISTORY), "a")

  def append(self, record: dict[str, Any]) -> None:
    self._file.write(json.dumps(record, sort_keys=True) + "\n")
    self._file.flush()
    os.fsync(self._file.fileno())

  def close(self) -> None:
    self._file.close()


class ScalarWriter:
  """TensorBoard scalars under WORKDIR/tb, or nothing when disabled."""

  def __init__(self, workdir: str, enabled: bool = True):
    self._writer = None
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._writer = SummaryWriter(os.path.join(workdir, "tb"), flush_secs=10)

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self._writer is None:
      return
    for name, value in values.items():
      self._writer.add_scalar(name, value, step)

  def text(self, step: int, name: str, value: str) -> None:
    if self._writer is not None:
      self._writer.add_text(name, value.replace("\n", "  \n"), step)

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


class NoHistory:
  """What processes other than 0 hold instead of the history: nothing."""
  done, pending, lines, replayed = (), (), 0, 0

  def append(self, record: dict[str, Any]) -> None:
    del record

  def drop_last(self, num: int, reason: str) -> None:
    del num, reason

  def close(self) -> None:
    pass


class SearchHistory:
  """history.jsonl of a running search: replays what a killed run left, appends.

  On open, the lines of steps before the restored checkpoint are final; the
  lines after them ("pending") belong to steps the checkpoint does not cover
  and are replayed in order, each only if it is exactly the child the resumed
  search proposes (same step, index, id and tokens). The first line that is
  not, and every pending line after it, moves to history.discarded.jsonl.
  """

  def __init__(self, workdir: str, step: int, children_done: int,
               discard_reason: str | None = None):
    self.workdir = workdir
    history, repaired = load_history(workdir)
    n_done = 0
    while n_done < len(history) and history[n_done]["step"] < step:
      n_done += 1
    self.done = history[:n_done]
    pending = history[n_done:]
    if n_done != children_done or any(r["step"] < step for r in pending):
      raise RuntimeError(
          f"{workdir}: history.jsonl holds {n_done} children before step {step} "
          f"but the checkpoint counts {children_done}; the workdir was modified "
          "by hand. Start a new workdir.")
    if pending and discard_reason:
      append_discarded(workdir, pending, discard_reason)
      logging.warning("%d children of unfinished steps moved to %s: %s",
                      len(pending), DISCARDED, discard_reason)
      pending, repaired = [], True
    if repaired:
      rewrite_history(workdir, self.done + pending)
    self.pending = collections.deque(pending)
    self.lines = n_done        # lines in the file that are not pending
    self.replayed = 0
    self._writer = HistoryWriter(workdir)

  def replay(self, record: dict[str, Any]) -> dict[str, Any] | None:
    """The recorded line of the child `record` describes, if the file has it."""
    if not self.pending:
      return None
    old = self.pending[0]
    if all(old.get(k) == record[k] for k in ("step", "index", "child_id", "tokens")):
      self.pending.popleft()
      self.lines += 1
      self.replayed += 1
      return old
    self._discard("not what the resumed search proposes (code or config changed)")
    return None

  def append(self, record: dict[str, Any]) -> None:
    if self.pending:
      self._discard("not what the resumed search proposes (code or config changed)")
    self._writer.append(record)
    self.lines += 1

  def drop_last(self, num: int, reason: str) -> None:
    """Moves the last `num` lines to history.discarded.jsonl (retried on resume)."""
    self._rewrite(self.lines - num, reason)

  def _discard(self, reason: str) -> None:
    self._rewrite(self.lines, reason)

  def _rewrite(self, keep: int, reason: str) -> None:
    self._writer.close()
    history = read_history(self.workdir)
    append_discarded(self.workdir, history[keep:], reason)
    logging.warning("%d history lines moved to %s: %s", len(history) - keep,
                    DISCARDED, reason)
    rewrite_history(self.workdir, history[:keep])
    self.pending.clear()
    self.lines = keep
    self._writer = HistoryWriter(self.workdir)

  def close(self) -> None:
    self._writer.close()
