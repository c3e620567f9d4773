"""A local web page and JSON API for a trained run or an extracted bundle (``tools/serve.py``)."""
from .app import create_app
from .routing import routing_maps
from .source import ServedModel, load_source

__all__ = ["ServedModel", "create_app", "load_source", "routing_maps"]
