"""The downstream benchmark: how a trained generalist adapts to real data it has not seen, against
training from scratch and a dense specialist, with fewer trainable parameters, fewer parameters
and less compute (``tools/downstream.py``, ``make downstream``; docs/downstream.md)."""
from .methods import ALL_METHODS, METHODS, Parents
from .protocol import Dataset, Protocol, run_all, run_method

__all__ = ["ALL_METHODS", "METHODS", "Dataset", "Parents", "Protocol", "run_all", "run_method"]
