"""NAS-RL search on MNIST-1D (Greydanus 2020): 1D signals, offline, CPU-sized.

    python -m rlnas.main --config=configs/mnist1d.py --workdir=/tmp/rlnas_mnist1d

Expected run time: about 15 minutes on a 2-core laptop CPU, no network, no
accelerator. Measured with --config.search.max_children=8 on a shared 2-core
CPU (jax 0.10.2): 8 children in 93 s, each ~6 s of XLA compilation and ~1 s
of training; 96 children extrapolate to 12-19 minutes.

Then retrain the best architecture and read its test accuracy on the official
1000 test signals, which the search never loads (about 30 s):

    python -m rlnas.retrain --config=configs/retrain_mnist1d.py \
        --arch=/tmp/rlnas_mnist1d/best.json --workdir=/tmp/rlnas_mnist1d_retrain

MNIST-1D's 40-sample signals run as 1 x 40 images, so filter and stride
heights are fixed at 1 (constants, not decisions) and the controller chooses
filter widths, stride widths, filter counts and skip connections. The choices
matter: three random 4-layer children reached 0.85, 0.91 and 0.95 validation
accuracy after 6 epochs, a spread the controller can learn from.
"""

import ml_collections

from configs import default
from rlnas import data


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  # 4000 generated training signals (500 held out for validation rewards) and
  # the official 1000 test signals, all generated locally (rlnas/data.py).
  config.data = data.get_data_config("mnist1d")

  # 1D space: heights fixed at 1; widths of 3 to 9 of the 40 samples, stride 1
  # or 2 (halving the signal), 16 to 64 filters.
  config.space.num_layers = 4
  config.space.filter_heights = (1,)
  config.space.stride_heights = (1,)
  config.space.filter_widths = (3, 5, 7, 9)
  config.space.stride_widths = (1, 2)
  config.space.num_filters = (16, 32, 64)

  # 6 epochs of 54 Adam steps (batch 64): enough to separate architectures
  # (see above) in about a second of training per child on a CPU.
  config.child.epochs = 6
  # 12 controller steps of 8 children, like the default digits search.
  config.search.max_children = 96
  return config
