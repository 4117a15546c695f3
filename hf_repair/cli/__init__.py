"""`hf-repair`: repair a saved checkpoint from the command line."""

from .command import main

__all__ = ["main"]
