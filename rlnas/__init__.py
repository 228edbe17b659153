"""rlnas: reinforcement-learning neural architecture search in JAX/Flax/Optax."""

__version__ = "0.1.0"
