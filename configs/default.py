"""The embedded default: a real NAS-RL search on scikit-learn's 8x8 digits, offline.

    python -m rlnas.main --config=configs/default.py --workdir=/tmp/rlnas_default

Expected run time: about 3 minutes on a 2-core laptop CPU (176 s measured for
the 200 children, ~70 children/min; figures in README.md), no network, no
accelerator. The same search on a GPU/TPU runs unchanged.

Sized to show learning in a few minutes: a small space (3 layers, kernels
{1,3,5}, filters {8,16,32}, skip connections) whose choices matter on 8x8
images (1x1 kernels see no neighbours), children trained briefly with Adam,
and a controller learning rate 50x the paper's so that 200 children are
enough to shift the policy (the paper's 0.0006 is tuned for 12,800).
"""

import ml_collections

from rlnas import data


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Seeds controller init, proposals (fold_in step) and children (fold_in child id).
  config.seed = 0

  # Data: see rlnas/data.py; 'digits' ships inside scikit-learn (offline).
  config.data = data.get_data_config("digits")

  config.space = ml_collections.ConfigDict()
  # Search space: 'nasrl_cnn' is Zoph & Le 2017's layer-by-layer CNN space.
  config.space.name = "nasrl_cnn"
  # Convolutional layers per child (the paper starts at 6, sec. 4.1).
  config.space.num_layers = 3
  # Choice lists (the paper's are {1,3,5,7}, {1,3,5,7}, {24,36,48,64}, sec. 4.1);
  # a list of one value is fixed, not predicted.
  config.space.filter_heights = (1, 3, 5)
  config.space.filter_widths = (1, 3, 5)
  config.space.stride_heights = (1,)
  config.space.stride_widths = (1,)
  config.space.num_filters = (8, 16, 32)
  # Predict which earlier layers feed each layer (anchor points, sec. 3.3).
  config.space.skip_connections = True

  config.controller = ml_collections.ConfigDict()
  # LSTM size and init: Zoph & Le 2017, sec. 4.1 (2 layers x 35, U[-0.08, 0.08]).
  config.controller.hidden_size = 35
  config.controller.num_layers = 2
  config.controller.init_range = 0.08
  # Adam learning rate; the paper uses 0.0006 (sec. 4.1) over 12,800 children.
  # A 200-child demo needs a much larger step to move the policy visibly.
  config.controller.learning_rate = 0.03
  # Global-norm gradient clipping of controller updates; 0 = off.
  config.controller.grad_clip_norm = 0.0
  # EMA baseline decay: b <- decay * b + (1 - decay) * mean reward. 0.9 averages
  # over ~10 steps (80 children), short enough to track a fast-improving policy.
  config.controller.baseline_decay = 0.9
  # Entropy bonus weight (ENAS uses 1e-4 for its macro search); 0 = off.
  config.controller.entropy_weight = 0.0
  # Sampling temperature (logits / T) and tanh clipping constant c
  # (logits = c * tanh(logits / T)); 1.0 and 0 = plain softmax.
  config.controller.temperature = 1.0
  config.controller.tanh_constant = 0.0

  config.child = ml_collections.ConfigDict()
  # Training epochs per child, batch size and evaluation batch size.
  config.child.epochs = 4
  config.child.batch_size = 64
  config.child.eval_batch_size = 512
  # 'momentum' (paper: 0.9 Nesterov, lr 0.1, sec. 4.1), 'adam' or 'sgd'. Adam
  # converges in the few steps a 4-epoch digits child gets.
  config.child.optimizer = "adam"
  config.child.learning_rate = 0.01
  config.child.momentum = 0.9
  config.child.nesterov = True
  # L2 weight decay on kernels (paper: 1e-4, sec. 4.1).
  config.child.weight_decay = 1e-4
  # 'constant' or 'cosine' learning rate over the child's steps.
  config.child.lr_schedule = "constant"
  # Classifier head: 'gap' (global average pool + dense) or 'flatten' + dense.
  config.child.head = "gap"
  # Bias in each convolution (Keras default; redundant before BatchNorm).
  config.child.use_bias = True
  # BatchNorm running-average momentum (Flax/Keras default 0.99). Short
  # children need faster statistics, or evaluation sees stale ones.
  config.child.bn_momentum = 0.9
  # 'auto': Python loop over a jitted step on CPU, lax.scan per epoch on GPU/TPU.
  config.child.loop = "auto"
  # 'layerwise' compiles each distinct layer once per search (rlnas/child/
  # layerwise.py), 'jit' compiles each child whole; 'auto' = layerwise on CPU,
  # jit on GPU/TPU (bench/child_study.md).
  config.child.engine = "auto"
  # JAX persistent compilation cache shared by every search on this machine
  # (threshold 0, so the small per-layer executables are cached too): a
  # second search skips most compilation (bench/child_study.md: 0.69x ->
  # 0.79x PyTorch eager, overhead 15% -> 2%). '' = off.
  config.child.compilation_cache_dir = "~/.cache/rlnas/jax"
  # Reject children whose feature maps shrink below this size (strides too
  # large for the input): they fail with failure_reward. 1 = off.
  config.child.min_spatial_size = 1

  config.reward = ml_collections.ConfigDict()
  # Reward = aggregate(last_k validation accuracies) ** power; the paper's is
  # the max of the last 5 epochs, cubed (sec. 4.1).
  config.reward.aggregate = "max"
  config.reward.last_k = 2
  config.reward.power = 3.0

  config.search = ml_collections.ConfigDict()
  # 'reinforce' (NAS-RL), 'random' (the honest control) or 'evolution'.
  config.search.strategy = "reinforce"
  # 'child_trainer' trains every child from scratch on config.data.
  config.search.evaluator = "child_trainer"
  # Architectures sampled per controller step (Zoph & Le 2017, sec. 4.1: m = 8).
  config.search.children_per_step = 8
  # Stop after this many children, or minutes (0 = no limit), or this many
  # controller steps without a better best reward (0 = off).
  config.search.max_children = 200
  config.search.max_minutes = 0.0
  config.search.patience_steps = 0
  # Reward given to a child that cannot be built or diverges; stop after this
  # many failures in a row (then the setup, not the architecture, is wrong).
  config.search.failure_reward = 0.0
  config.search.max_consecutive_failures = 20
  # Reuse the first successful result of an architecture sampled again instead
  # of retraining it (history: metrics.cached_from). Off for reproductions:
  # in the paper every sample is a freshly trained, noisy reward (sec. 3.2).
  # Repeats are marked in the history either way (repeat_of).
  config.search.reward_cache = False
  # Checkpoints kept in WORKDIR/checkpoints (one is written per controller step).
  config.search.checkpoints_to_keep = 3
  # Write TensorBoard event files to WORKDIR/tb.
  config.search.tensorboard = True
  # Resume a workdir whose saved config differs in more than budgets.
  config.search.allow_config_change = False
  config.search.depth_schedule = ml_collections.ConfigDict()
  # Depth schedule (Zoph & Le 2017, sec. 4.1: start at 6 layers, +2 every 1,600
  # children); every_children = 0 switches it off and space.num_layers holds.
  config.search.depth_schedule.start_layers = 6
  config.search.depth_schedule.add_layers = 2
  config.search.depth_schedule.every_children = 0
  config.search.depth_schedule.max_layers = 20

  config.evolution = ml_collections.ConfigDict()
  # Regularized evolution (Real et al. 2019); NATS-Bench settings: population 10,
  # tournament sample 3.
  config.evolution.population_size = 10
  config.evolution.sample_size = 3

  config.distributed = ml_collections.ConfigDict()
  # Multi-process runs (JAX's runtime): enabled = auto-detect (TPU VM, SLURM);
  # or give coordinator_address ('host:port'), num_processes and process_id.
  config.distributed.enabled = False
  config.distributed.coordinator_address = ""
  config.distributed.num_processes = 1
  config.distributed.process_id = 0
  # A process that stops sending heartbeats this long is dead, and JAX stops
  # the others (jax.distributed.initialize; 100 s and 300 s are JAX's defaults).
  config.distributed.heartbeat_timeout_seconds = 100
  config.distributed.initialization_timeout_seconds = 300
  # How long a finished process waits for the others at exit.
  config.distributed.shutdown_timeout_seconds = 60
  # Longest wait for another process (a child's result, a step boundary) before
  # the job is declared stuck; must exceed the longest child's training time.
  config.distributed.collective_timeout_seconds = 3600
  # Children trained at once on each local device (threads). 0 = auto: on CPU,
  # one per core in a one-process job (the layer-wise engine's executables run
  # single-threaded; two made the default search 1.26-1.58x faster on 2 cores,
  # bench/README.md), else 1.
  # More than 1 can also fill a large GPU with small children.
  config.distributed.children_per_device = 0
  return config
