"""What every search space shares: decisions, architectures, and uniform sampling.

A search space is plain data: an ordered tuple of `Decision`s. The controller walks
that tuple to sample tokens; the space turns a token vector back into a readable,
immutable architecture value. Nothing here knows about the controller or the child
trainer, so spaces can be swapped without touching either.

Tokens are laid out flat, in decision order: a categorical decision owns one token
in [0, num_choices); an anchor decision (Zoph & Le 2017, sec. 3.3, skip
connections) owns `num_choices` binary tokens, one per earlier layer.
"""

import dataclasses
import json
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

CATEGORICAL = "categorical"
ANCHOR = "anchor"


class ArchitectureError(ValueError):
  """A token vector or architecture file does not fit the search space."""


@dataclasses.dataclass(frozen=True)
class Decision:
  """One choice the controller makes.

  Attributes:
    name: stable path used in logs and metrics, e.g. "layer_2/filter_height".
    kind: CATEGORICAL (one token in [0, num_choices)) or ANCHOR (num_choices
      binary tokens: does earlier layer j feed this layer).
    num_choices: size of the categorical choice list, or the number of earlier
      layers an anchor decision chooses among.
    head: the controller's softmax head and embedding used for this decision;
      decisions of the same type share one across layers.
  """
  name: str
  kind: str
  num_choices: int
  head: str

  def __post_init__(self):
    if self.kind not in (CATEGORICAL, ANCHOR):
      raise ValueError(f"Decision {self.name}: unknown kind {self.kind!r}")
    if self.kind == CATEGORICAL and self.num_choices < 1:
      raise ValueError(f"Decision {self.name}: needs at least one choice")
    if self.kind == ANCHOR and self.num_choices < 0:
      raise ValueError(f"Decision {self.name}: negative anchor count")

  @property
  def num_tokens(self) -> int:
    return 1 if self.kind == CATEGORICAL else self.num_choices


def num_tokens(decisions: Sequence[Decision]) -> int:
  return sum(d.num_tokens for d in decisions)


def heads(decisions: Sequence[Decision]) -> dict[str, int]:
  """Head name -> number of choices, for the categorical heads of `decisions`.

  Raises if two decisions share a head but disagree on its size.
  """
  sizes: dict[str, int] = {}
  for d in decisions:
    if d.kind != CATEGORICAL:
      continue
    if sizes.setdefault(d.head, d.num_choices) != d.num_choices:
      raise ValueError(f"head {d.head!r} used with {sizes[d.head]} and "
                       f"{d.num_choices} choices")
  return sizes


def log_space_size(decisions: Sequence[Decision]) -> float:
  """Natural log of the number of distinct token vectors (= uniform entropy)."""
  return float(sum(np.log(d.num_choices) if d.kind == CATEGORICAL
                   else d.num_choices * np.log(2.0) for d in decisions))


def random_tokens(decisions: Sequence[Decision], rng: jax.Array,
                  num: int) -> jax.Array:
  """Uniform samples over the space: int32 [num, num_tokens]. Jittable."""
  columns = []
  keys = jax.random.split(rng, max(len(decisions), 1))
  for key, d in zip(keys, decisions):
    if d.kind == CATEGORICAL:
      columns.append(jax.random.randint(key, (num, 1), 0, d.num_choices))
    elif d.num_choices:
      columns.append(jax.random.bernoulli(key, 0.5, (num, d.num_choices)))
  if not columns:
    return jnp.zeros((num, 0), jnp.int32)
  return jnp.concatenate([c.astype(jnp.int32) for c in columns], axis=1)


def check_tokens(decisions: Sequence[Decision], tokens: Sequence[int]) -> tuple[int, ...]:
  """Validates a flat token vector against `decisions`; returns it as ints."""
  tokens = tuple(int(t) for t in tokens)
  expected = num_tokens(decisions)
  if len(tokens) != expected:
    raise ArchitectureError(
        f"expected {expected} tokens for this search space, got {len(tokens)}")
  pos = 0
  for d in decisions:
    limit = d.num_choices if d.kind == CATEGORICAL else 2
    for t in tokens[pos:pos + d.num_tokens]:
      if not 0 <= t < limit:
        raise ArchitectureError(
            f"token {t} for decision {d.name} is outside [0, {limit})")
    pos += d.num_tokens
  return tokens


def split_tokens(decisions: Sequence[Decision],
                 tokens: Sequence[int]) -> dict[str, Any]:
  """Decision name -> its token (int) or anchor bits (tuple of ints)."""
  out, pos = {}, 0
  for d in decisions:
    chunk = tuple(tokens[pos:pos + d.num_tokens])
    out[d.name] = chunk[0] if d.kind == CATEGORICAL else chunk
    pos += d.num_tokens
  return out


@dataclasses.dataclass(frozen=True)
class Architecture:
  """An immutable sampled architecture: the space it belongs to and its tokens.

  `details` holds the decoded, space-specific fields (a tuple of per-layer
  records for the CNN space, edge operations for NAS-Bench-201); `text` is the
  space's readable rendering.
  """
  space: str
  tokens: tuple[int, ...]
  details: Any = dataclasses.field(compare=False, hash=False, default=None)
  text: str = dataclasses.field(compare=False, hash=False, default="")

  @property
  def key(self) -> str:
    """Stable identifier, equal for equal (space, tokens)."""
    return f"{self.space}:" + ".".join(str(t) for t in self.tokens)

  def __str__(self) -> str:
    return self.text or self.key

  def to_json(self) -> dict[str, Any]:
    return {"space": self.space, "tokens": list(self.tokens),
            "key": self.key, "text": self.text,
            "details": _jsonable(self.details)}


def _jsonable(value: Any) -> Any:
  if dataclasses.is_dataclass(value):
    return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  return value


def tokens_from_json(record: Any, space_name: str) -> tuple[int, ...]:
  """Reads the tokens of an architecture record (a dict or a JSON string).

  Accepts what `Architecture.to_json` wrote, or a `best.json`/history line that
  holds it under "architecture". Raises ArchitectureError naming the problem.
  """
  if isinstance(record, (str, bytes)):
    try:
      record = json.loads(record)
    except json.JSONDecodeError as e:
      raise ArchitectureError(f"architecture is not valid JSON: {e}") from None
  if isinstance(record, Mapping) and "architecture" in record:
    record = record["architecture"]
  if not isinstance(record, Mapping) or "tokens" not in record:
    raise ArchitectureError(
        "architecture JSON needs a 'tokens' list (as written in best.json)")
  if record.get("space", space_name) != space_name:
    raise ArchitectureError(
        f"architecture belongs to search space {record.get('space')!r}, "
        f"but this run uses {space_name!r}")
  tokens = record["tokens"]
  if not isinstance(tokens, list) or not all(
      isinstance(t, int) and not isinstance(t, bool) for t in tokens):
    raise ArchitectureError("architecture 'tokens' must be a list of ints")
  return tuple(tokens)
