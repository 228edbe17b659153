"""The NAS-Bench-201 cell search space (Dong & Yang 2020).

A cell is a DAG over 4 nodes; each of its 6 edges i->j (i < j) carries one of 5
operations (NAS-Bench-201, sec. 2.1 and Fig. 1). The whole space has
5**6 = 15,625 cells, every one trained and tabulated by the benchmark, so a
search on it is a table lookup (see `rlnas.tabular`).

Three equivalent encodings of a cell are used in rlnas:
- tokens: int [6], the op index of each edge in `EDGES` order (the controller's
  output; one categorical decision per edge).
- index: int in [0, 15625), the tokens read as a base-5 number, first edge most
  significant. This is rlnas's dense row order for tables; it is NOT the
  benchmark's own `nb201_index` (tables keep that column for cross-reference).
- arch string: the benchmark's `|op~0|+|op~0|op~1|+|op~0|op~1|op~2|`, node by
  node, `op~j` meaning "op applied to node j's output".

`tokens_to_index` and `index_to_tokens` are jittable; string conversion is host
code.
"""

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlnas.spaces import base

SPACE_NAME = "nb201"

# NAS-Bench-201, sec. 2.1: the operation set, in the benchmark's op-index order
# (the `op_indices` digits of the shared table use the same order).
OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
# Edges (from_node, to_node) in the order the arch string lists them: node 1's
# inputs, then node 2's, then node 3's.
EDGES = ((0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3))
NUM_OPS = len(OPS)
NUM_EDGES = len(EDGES)
NUM_ARCHS = NUM_OPS ** NUM_EDGES  # 15,625
NUM_NODES = 4

# Base-5 place values, first edge most significant: [3125, 625, 125, 25, 5, 1].
_PLACES = np.array([NUM_OPS ** (NUM_EDGES - 1 - e) for e in range(NUM_EDGES)],
                   np.int32)


def edge_name(edge: int) -> str:
  """Stable decision path of edge `edge`, e.g. "edge_0_1/op" for 0->1."""
  src, dst = EDGES[edge]
  return f"edge_{src}_{dst}/op"


def tokens_to_index(tokens: jax.Array) -> jax.Array:
  """Dense index of cells. tokens: int [..., 6] -> int32 [...]. Jittable."""
  return jnp.sum(jnp.asarray(tokens, jnp.int32) * _PLACES, axis=-1)


def index_to_tokens(index: jax.Array) -> jax.Array:
  """Inverse of `tokens_to_index`. index: int [...] -> int32 [..., 6]."""
  index = jnp.asarray(index, jnp.int32)
  return (index[..., None] // _PLACES) % NUM_OPS


def tokens_to_str(tokens: Sequence[int]) -> str:
  """Benchmark arch string of a token vector (6 ints in `EDGES` order)."""
  tokens = _check(tokens)
  nodes, edge = [], 0
  for dst in range(1, NUM_NODES):
    ops = []
    for src in range(dst):
      assert EDGES[edge] == (src, dst)
      ops.append(f"{OPS[tokens[edge]]}~{src}")
      edge += 1
    nodes.append("|" + "|".join(ops) + "|")
  return "+".join(nodes)


def str_to_tokens(arch_str: str) -> tuple[int, ...]:
  """Parses a benchmark arch string into 6 op tokens; raises ArchitectureError."""
  nodes = arch_str.strip().split("+")
  if len(nodes) != NUM_NODES - 1:
    raise base.ArchitectureError(
        f"{arch_str!r}: expected {NUM_NODES - 1} '+'-separated nodes")
  tokens = []
  for dst, node in enumerate(nodes, start=1):
    if not (node.startswith("|") and node.endswith("|")):
      raise base.ArchitectureError(f"{arch_str!r}: node {node!r} not in |..|")
    entries = node[1:-1].split("|")
    if len(entries) != dst:
      raise base.ArchitectureError(
          f"{arch_str!r}: node {dst} needs {dst} inputs, got {len(entries)}")
    for src, entry in enumerate(entries):
      op, sep, src_text = entry.partition("~")
      if not sep or src_text != str(src):
        raise base.ArchitectureError(
            f"{arch_str!r}: entry {entry!r} should read 'op~{src}'")
      if op not in OPS:
        raise base.ArchitectureError(
            f"{arch_str!r}: unknown op {op!r}; known: {', '.join(OPS)}")
      tokens.append(OPS.index(op))
  return tuple(tokens)


def _check(tokens: Sequence[int]) -> tuple[int, ...]:
  tokens = tuple(int(t) for t in np.asarray(tokens).reshape(-1))
  if len(tokens) != NUM_EDGES or not all(0 <= t < NUM_OPS for t in tokens):
    raise base.ArchitectureError(
        f"NAS-Bench-201 tokens must be {NUM_EDGES} ints in [0, {NUM_OPS}), "
        f"got {tokens}")
  return tokens


@dataclasses.dataclass(frozen=True)
class NB201Space:
  """The NAS-Bench-201 cell space as 6 categorical decisions (one per edge).

  Attributes:
    shared_head: if True every edge uses one controller softmax head/embedding
      named "op" (the operation lists are identical); if False each edge gets
      its own head "op_<src>_<dst>" (what independent per-edge logits amount
      to). Measured in bench/nb201_results.md.
  """
  shared_head: bool = True
  name: str = SPACE_NAME

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> "NB201Space":
    return cls(shared_head=bool(cfg.get("shared_head", True)))

  @property
  def decisions(self) -> tuple[base.Decision, ...]:
    return tuple(
        base.Decision(edge_name(e), base.CATEGORICAL, NUM_OPS,
                      "op" if self.shared_head else f"op_{src}_{dst}")
        for e, (src, dst) in enumerate(EDGES))

  @property
  def num_tokens(self) -> int:
    return NUM_EDGES

  def random_tokens(self, rng: jax.Array, num: int) -> jax.Array:
    """Uniform cells: int32 [num, 6]. Jittable."""
    return jax.random.randint(rng, (num, NUM_EDGES), 0, NUM_OPS, jnp.int32)

  def from_tokens(self, tokens: Sequence[int]) -> base.Architecture:
    """Architecture whose `text` is the benchmark arch string."""
    tokens = _check(tokens)
    details = {edge_name(e): OPS[t] for e, t in enumerate(tokens)}
    return base.Architecture(self.name, tokens, details, tokens_to_str(tokens))

  def from_str(self, arch_str: str) -> base.Architecture:
    return self.from_tokens(str_to_tokens(arch_str))

  def from_index(self, index: int) -> base.Architecture:
    if not 0 <= int(index) < NUM_ARCHS:
      raise base.ArchitectureError(f"index {index} outside [0, {NUM_ARCHS})")
    return self.from_tokens(np.asarray(index_to_tokens(int(index))))
