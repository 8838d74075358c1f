"""Command-line entry points: ``safe-jax <command>`` or ``python -m launch.<command>``."""
