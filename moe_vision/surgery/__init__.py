"""Modularity: expert usage, extraction into per-task bundles, adding tasks with frozen old
parameters, parameter-efficient fine-tuning of bundles."""
from .bundle import load_bundle, read_bundle_info, write_bundle
from .continual import add_task
from .extract import extract_task
from .select import select_layer

__all__ = ["add_task", "extract_task", "load_bundle", "read_bundle_info", "select_layer", "write_bundle"]
