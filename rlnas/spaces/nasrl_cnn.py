"""The NAS-RL layer-by-layer CNN search space and its child network.

Zoph & Le 2017 ("Neural Architecture Search with Reinforcement Learning"),
sec. 3.1 and 3.3, Fig. 4: per layer the controller predicts an anchor point
(which earlier layers feed this one), then filter height, filter width, stride
height, stride width and number of filters. Choice lists and depth come from the
config, so the paper's values (sec. 4.1: heights/widths {1,3,5,7}, filters
{24,36,48,64}, strides {1,2,3} in one experiment and fixed at 1 in another) and
tiny test values run through the same code.

A choice list of length one (e.g. strides fixed at 1, or filter height 1 for 1D
inputs) is a constant, not a decision: the controller makes no prediction for it,
as in the paper's fixed-stride experiment.

The child network built from an architecture lives in `rlnas/child/cnn.py`.
"""

import dataclasses
from typing import Sequence

import jax
import ml_collections

from rlnas.spaces import base

SPACE_NAME = "nasrl_cnn"

# Field name -> (config attribute, controller head). Order is the paper's
# per-layer prediction order (Zoph & Le 2017, Fig. 4).
_FIELDS = (
    ("filter_height", "filter_heights"),
    ("filter_width", "filter_widths"),
    ("stride_height", "stride_heights"),
    ("stride_width", "stride_widths"),
    ("num_filters", "num_filters"),
)


@dataclasses.dataclass(frozen=True)
class Layer:
  """One decoded layer. `inputs` are indices of earlier layers; () = image."""
  filter_height: int
  filter_width: int
  stride_height: int
  stride_width: int
  num_filters: int
  inputs: tuple[int, ...]

  def describe(self, index: int) -> str:
    src = ",".join(f"L{j}" for j in self.inputs) if self.inputs else "image"
    return (f"L{index}: conv {self.filter_height}x{self.filter_width} "
            f"stride {self.stride_height}x{self.stride_width} "
            f"filters {self.num_filters} <- {src}")


@dataclasses.dataclass(frozen=True)
class NASRLCNNSpace:
  """Layer-by-layer CNN space. Hashable; `decisions` is plain data."""
  num_layers: int
  filter_heights: tuple[int, ...]
  filter_widths: tuple[int, ...]
  stride_heights: tuple[int, ...]
  stride_widths: tuple[int, ...]
  num_filters: tuple[int, ...]
  skip_connections: bool = True
  name: str = SPACE_NAME

  def __post_init__(self):
    if self.num_layers < 1:
      raise ValueError(f"space.num_layers must be >= 1, got {self.num_layers}")
    for _, attr in _FIELDS:
      values = getattr(self, attr)
      if not values:
        raise ValueError(f"space.{attr} is empty; give at least one choice")
      if any(int(v) < 1 for v in values):
        raise ValueError(f"space.{attr} must hold positive ints, got {values}")
      if len(set(values)) != len(values):
        raise ValueError(f"space.{attr} has repeated choices: {values}")

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> "NASRLCNNSpace":
    return cls(num_layers=int(cfg.num_layers),
               **{attr: tuple(int(v) for v in cfg[attr]) for _, attr in _FIELDS},
               skip_connections=bool(cfg.skip_connections))

  def with_num_layers(self, num_layers: int) -> "NASRLCNNSpace":
    return dataclasses.replace(self, num_layers=num_layers)

  @property
  def decisions(self) -> tuple[base.Decision, ...]:
    out = []
    for i in range(self.num_layers):
      if self.skip_connections:
        # Every layer has an anchor point (Fig. 4); layer 0's chooses among
        # no earlier layers, so it owns no tokens but gives the controller the
        # hidden state later layers attend to.
        out.append(base.Decision(f"layer_{i}/inputs", base.ANCHOR, i, "anchor"))
      for field, attr in _FIELDS:
        choices = getattr(self, attr)
        if len(choices) > 1:
          out.append(base.Decision(f"layer_{i}/{field}", base.CATEGORICAL,
                                   len(choices), field))
    return tuple(out)

  @property
  def num_tokens(self) -> int:
    return base.num_tokens(self.decisions)

  def random_tokens(self, rng: jax.Array, num: int) -> jax.Array:
    return base.random_tokens(self.decisions, rng, num)

  def from_tokens(self, tokens: Sequence[int]) -> base.Architecture:
    """Decodes a flat token vector; raises ArchitectureError if it does not fit."""
    decisions = self.decisions
    by_name = base.split_tokens(decisions, base.check_tokens(decisions, tokens))
    layers = []
    for i in range(self.num_layers):
      fields = {}
      for field, attr in _FIELDS:
        choices = getattr(self, attr)
        fields[field] = choices[by_name.get(f"layer_{i}/{field}", 0)]
      if i == 0:
        inputs = ()
      elif self.skip_connections:
        bits = by_name[f"layer_{i}/inputs"]
        inputs = tuple(j for j, b in enumerate(bits) if b)
      else:
        inputs = (i - 1,)
      layers.append(Layer(inputs=inputs, **fields))
    layers = tuple(layers)
    text = "\n".join(layer.describe(i) for i, layer in enumerate(layers))
    return base.Architecture(self.name, tuple(int(t) for t in tokens),
                             layers, text)

  def to_tokens(self, layers: Sequence[Layer]) -> tuple[int, ...]:
    """Inverse of `from_tokens` for hand-written architectures."""
    if len(layers) != self.num_layers:
      raise base.ArchitectureError(
          f"{len(layers)} layers given, space has {self.num_layers}")
    tokens = []
    for i, layer in enumerate(layers):
      if self.skip_connections:
        tokens.extend(int(j in layer.inputs) for j in range(i))
      elif i > 0 and layer.inputs != (i - 1,):
        raise base.ArchitectureError(
            f"layer {i} inputs {layer.inputs}: this space has no skip "
            "connections, each layer feeds the next")
      for field, attr in _FIELDS:
        choices = getattr(self, attr)
        value = getattr(layer, field)
        if value not in choices:
          raise base.ArchitectureError(
              f"layer {i} {field}={value} is not among {choices}")
        if len(choices) > 1:
          tokens.append(choices.index(value))
    return tuple(tokens)
