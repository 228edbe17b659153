"""Zoph & Le 2017 (NAS-RL), CIFAR-10 layer-by-layer CNN search, paper settings.

    python -m rlnas.main --config=configs/nasrl_cifar10.py --workdir=gs://BUCKET/nasrl \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Needs CIFAR-10 prepared for TFDS in data_dir (on a machine with network:
`pip install 'rlnas[prepare]'` then
`tfds build cifar10 --data_dir=DIR --file_format=array_record`); without it the
run stops at once with that instruction and writes nothing.

Expected run time: the paper trained 12,800 children of 50 epochs each with 800
GPUs for 28 days. One child of ~15 layers x 48 filters is ~60 PFLOP of
training (launch/README.md works through the estimate): minutes per child on
one modern accelerator, so ~1,000-3,000 accelerator-hours for the full search;
spread children over all processes with launch/ (tpu_vm.sh, slurm_gpu.sbatch).
For a quick look, cap it: --config.search.max_children=64.
"""

import ml_collections

from configs import default
from rlnas import data


def get_config() -> ml_collections.ConfigDict:
  # Start from the embedded default so every field exists with its comment.
  config = default.get_config()

  # CIFAR-10 through TFDS; 45,000 train / 5,000 validation (sec. 4.1), with
  # pad-4 random crops and horizontal flips on device.
  config.data = data.get_data_config("cifar10")

  # Sec. 4.1: filter height and width in {1,3,5,7}, filters in {24,36,48,64};
  # strides fixed at 1 (the paper's main experiment; set both stride lists to
  # (1, 2, 3) for the stride-predicting variant); anchor-point skip connections.
  config.space.filter_heights = (1, 3, 5, 7)
  config.space.filter_widths = (1, 3, 5, 7)
  config.space.num_filters = (24, 36, 48, 64)
  config.space.stride_heights = (1,)
  config.space.stride_widths = (1,)
  config.space.skip_connections = True
  config.space.num_layers = 6

  # Sec. 4.1: two-layer LSTM, 35 hidden units, U[-0.08, 0.08], Adam lr 0.0006.
  config.controller.learning_rate = 0.0006
  # The paper does not give its baseline decay; ENAS uses 0.99 over long runs.
  config.controller.baseline_decay = 0.99
  config.controller.entropy_weight = 0.0

  # Sec. 4.1: children trained 50 epochs, momentum 0.9 Nesterov, lr 0.1,
  # weight decay 1e-4. Batch size is not stated; 128 is ENAS's.
  config.child.epochs = 50
  config.child.batch_size = 128
  config.child.eval_batch_size = 1000
  config.child.optimizer = "momentum"
  config.child.learning_rate = 0.1
  config.child.momentum = 0.9
  config.child.nesterov = True
  config.child.weight_decay = 1e-4
  config.child.lr_schedule = "constant"
  config.child.bn_momentum = 0.99

  # Sec. 4.1: reward = (max validation accuracy of the last 5 epochs) ** 3.
  config.reward.aggregate = "max"
  config.reward.last_k = 5
  config.reward.power = 3.0

  # Sec. 3.4 / 4.1: m = 8 children per controller step, 12,800 children; depth
  # starts at 6 layers and grows by 2 every 1,600 children.
  config.search.children_per_step = 8
  config.search.max_children = 12_800
  config.search.depth_schedule.start_layers = 6
  config.search.depth_schedule.add_layers = 2
  config.search.depth_schedule.every_children = 1_600
  config.search.depth_schedule.max_layers = 20
  return config
