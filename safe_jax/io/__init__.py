"""Checkpoint folders and architectures: reading and writing diffusers/transformers folders
(``folders``), Flax path ↔ PyTorch key conversion (``convert``) and the presets of well-known
checkpoints (``presets``). Nothing here runs a model."""
