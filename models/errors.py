"""Errors raised by the model directory code."""


class ModelDirError(Exception):
    """A model directory is missing, malformed, tampered with, or cannot be built."""
