"""Configuration of the MoE parts of a model (plain dataclass, mirrored by configs/model/*.yaml)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class MoEConfig:
    """Options of every MoE layer in a backbone.

    ``granularity`` makes experts fine-grained as in Mod-Squad: each expert's hidden width is
    the dense MLP hidden width divided by ``granularity``.
    ``mlp_blocks`` / ``attn_blocks`` select which blocks get MoE MLPs / attention experts:
    ``"every_2"`` (blocks 1, 3, 5, ...), ``"every_N"``, ``"all"``, ``"none"``, ``"last_N"``
    or an explicit list of block indices.
    """

    num_experts: int = 8
    top_k: int = 2
    granularity: int = 1
    router_mode: str = "per_task"
    renormalize: bool = True
    noisy_gating: bool = False
    capacity_factor: float = 0.0
    activation: str = "gelu"
    expert_scale: float = 1.0
    mlp_blocks: str | list[int] = "every_2"
    attn_blocks: str | list[int] = "none"
    attn_num_experts: int = 8
    attn_top_k: int = 2
    aux_weights: dict = field(default_factory=lambda: {"mutual_information": 0.0, "load_balance": 0.01, "z_loss": 0.001})
    kernel: str = "auto"  # grouped expert matmuls: auto | grouped_mm | loop (moe_vision.moe.grouped)
    # Written by the surgery tools, rarely by hand:
    layer_num_experts: dict = field(default_factory=dict)  # layer name -> experts (extracted bundles)
    added_experts: list = field(default_factory=list)  # expert groups added by add_task, in order
    task_added_groups: dict = field(default_factory=dict)  # task -> how many added groups its router sees

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "MoEConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MoE option(s) {unknown}; expected some of {sorted(known)}")
        if "mlp_blocks" in d and not isinstance(d["mlp_blocks"], str):
            d["mlp_blocks"] = [int(i) for i in d["mlp_blocks"]]
        if "attn_blocks" in d and not isinstance(d["attn_blocks"], str):
            d["attn_blocks"] = [int(i) for i in d["attn_blocks"]]
        return cls(**d)


def resolve_blocks(pattern: str | list[int], depth: int, field_name: str = "mlp_blocks") -> list[int]:
    """Turn a placement pattern into sorted block indices in ``[0, depth)``."""
    if isinstance(pattern, (list, tuple)):
        idx = sorted(set(int(i) for i in pattern))
        bad = [i for i in idx if not 0 <= i < depth]
        if bad:
            raise ValueError(f"{field_name}: block indices {bad} out of range for depth {depth}")
        return idx
    if pattern == "none":
        return []
    if pattern == "all":
        return list(range(depth))
    if pattern.startswith("every_") and pattern[6:].isdigit() and int(pattern[6:]) > 0:
        n = int(pattern[6:])
        return [i for i in range(depth) if i % n == n - 1]
    if pattern.startswith("last_") and pattern[5:].isdigit():
        return list(range(max(0, depth - int(pattern[5:])), depth))
    raise ValueError(
        f"{field_name}: unknown pattern {pattern!r}; expected 'all', 'none', 'every_N', 'last_N' or a list of indices"
    )
