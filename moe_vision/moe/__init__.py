"""The sparse mixture-of-experts layer. Knows nothing about vision."""
from .attention import GroupedLinear, MoEAttention
from .config import MoEConfig, resolve_blocks
from .dispatch import DispatchPlan, TokenDispatcher
from .experts import GroupedExperts
from .layer import MoEMLP, RoutingOutput
from .losses import (AuxLosses, AuxLossWeights, compute_aux_losses, load_balancing_loss,
                     mutual_information_loss, router_z_loss)
from .router import TaskRouter, check_task
from .stats import ExpertUsage

__all__ = [
    "AuxLossWeights", "AuxLosses", "DispatchPlan", "ExpertUsage", "GroupedExperts", "GroupedLinear",
    "MoEAttention", "MoEConfig", "MoEMLP", "RoutingOutput", "TaskRouter", "TokenDispatcher",
    "check_task", "compute_aux_losses", "load_balancing_loss", "mutual_information_loss",
    "resolve_blocks", "router_z_loss",
]
