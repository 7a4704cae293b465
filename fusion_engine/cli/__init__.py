"""The ``fusion-engine`` command (``main.py``) and the PNG files it writes with their parameters."""
from .main import main

__all__ = ["main"]
