"""Flax modules whose parameter trees mirror diffusers/transformers PyTorch state dicts."""
