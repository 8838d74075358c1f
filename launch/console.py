"""Console logging for the long-running commands (train, demo): our progress lines, others' warnings."""

from __future__ import annotations

import logging

QUIET = ("absl", "jax._src", "orbax", "grain", "tensorflow_datasets")


def log_to_console() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
