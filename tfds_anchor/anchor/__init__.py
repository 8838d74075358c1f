"""The ANCHOR news image–caption dataset (folder-style TFDS builder)."""
