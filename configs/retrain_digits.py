"""Final retraining of an architecture found by configs/default.py, on digits.

    python -m rlnas.main --config=configs/default.py --workdir=/tmp/rlnas_default
    python -m rlnas.retrain --config=configs/retrain_digits.py \
        --arch=/tmp/rlnas_default/best.json --workdir=/tmp/rlnas_default_retrain

Expected run time: under a minute on a 2-core laptop CPU, no network
(measured 43 s on a shared 2-core CPU for a 3-layer architecture: 15 s
compilation, 12 s for 30 epochs; test accuracy 0.997).

Data, space and child network come from the search config: the same
`split_seed` and `test_size` keep the 300 test digits out of everything the
search saw, and the same space gives the architecture's tokens their meaning.
The search's 300 validation digits join the training set. The schedule is
longer than a search child's (4 epochs) and decays the learning rate.
"""

import ml_collections

from configs import default as search_config
from rlnas import retrain


def get_config() -> ml_collections.ConfigDict:
  # seed, data, space and child come from the search config (see
  # retrain.config_from_search); only the schedule changes here.
  config = retrain.config_from_search(search_config.get_config())
  # 30 epochs of train + validation (1497 digits, 23 steps of 64): the test
  # accuracy of the default search's architectures has levelled off by then.
  config.child.epochs = 30
  # Cosine decay to zero over all steps (Loshchilov & Hutter 2017, SGDR; the
  # ENAS final training uses it, Pham et al. 2018, sec. 3.2). Adam at the
  # search's 0.01, which converges on digits in the epochs given here.
  config.child.lr_schedule = "cosine"
  return config
