"""One exception type for everything a user can get wrong, so the CLI can print one clear line."""


class SafeJaxError(Exception):
    """Bad input: a missing or corrupt file, a shape mismatch, an unsupported architecture."""
