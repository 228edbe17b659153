"""Child networks and their trainer.

`build_model` turns an architecture of any image search space into a Flax module;
`trainer.train_and_evaluate` trains it and reports per-epoch validation accuracy.
"""

import flax.linen as nn
import ml_collections

from rlnas.child import cnn
from rlnas.spaces import base
from rlnas.spaces import nasrl_cnn


def build_model(arch: base.Architecture, num_classes: int,
                cfg: ml_collections.ConfigDict) -> nn.Module:
  """The Flax child network of `arch`, configured by `config.child`."""
  if arch.space == nasrl_cnn.SPACE_NAME:
    return cnn.NASRLConvNet(layers=arch.details, num_classes=num_classes,
                            head=cfg.head, use_bias=cfg.use_bias,
                            bn_momentum=cfg.bn_momentum)
  raise ValueError(f"no child network for search space {arch.space!r}")
