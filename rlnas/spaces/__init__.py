"""Search spaces as plain data, looked up by `config.space.name`.

To add a space: write a module with a frozen dataclass exposing `name`,
`decisions`, `num_tokens`, `random_tokens(rng, num)`, `from_tokens(tokens)` and a
`from_config(cfg)` classmethod, then add it to `_REGISTRY` below.
"""

import ml_collections

from rlnas.spaces import base
from rlnas.spaces import nasrl_cnn
from rlnas.spaces import nb201

_REGISTRY = {
    nasrl_cnn.SPACE_NAME: nasrl_cnn.NASRLCNNSpace,
    nb201.SPACE_NAME: nb201.NB201Space,
}


def names() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def register(name: str, space_cls) -> None:
  _REGISTRY[name] = space_cls


def make(cfg: ml_collections.ConfigDict):
  """Builds the search space named by `cfg.name` from the rest of `cfg`."""
  if cfg.name not in _REGISTRY:
    raise ValueError(f"unknown search space {cfg.name!r}; known: "
                     f"{', '.join(names())} (set config.space.name)")
  return _REGISTRY[cfg.name].from_config(cfg)
