"""Deployment: bundles (or one task of a full model) exported to ONNX or torch.export with a
static-shaped MoE path, parity checks against PyTorch, latency measurement."""
from .graph import POST_OUTPUTS, RAW_OUTPUTS, TaskGraph, dense_experts, moe_cost, task_graph
from .pipeline import export_model, latency_table

__all__ = ["POST_OUTPUTS", "RAW_OUTPUTS", "TaskGraph", "dense_experts", "export_model", "latency_table", "moe_cost",
           "task_graph"]
