"""Measurements of the toolkit itself: what a training step costs (FLOPs, activation memory)."""
from .cost import StepCost, recipe_costs, task_cost

__all__ = ["StepCost", "recipe_costs", "task_cost"]
