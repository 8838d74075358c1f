"""Readers of the manual-directory layouts people hold, each mapped onto the same records."""
