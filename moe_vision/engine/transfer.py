"""Where tasks help or fight each other in a trained generalist: per shared parameter group, each
task's gradient norm and the cosine between two tasks' gradients (negative: an update for one
task undoes part of the other's), measured on a few training batches; each task's routing (how
many experts it really uses); and its training loss beside a dense single-task run's.

Legend: G parameter groups, T tasks; a group's gradient is the concatenation of its parameters'.
"""
from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Mapping

import torch

from ..moe import RoutingOutput
from .evaluate import fixed_subset, iterate_batches

# Shared parameter groups, matched in order (the first pattern that matches a name wins).
# Task-owned parameters (heads, task embeddings, per-task routers, per-task adapters) are left
# out: only one task writes them.
SHARED_GROUPS: tuple[tuple[str, str], ...] = (
    ("patch stem", r"^backbone\.(patch_embed\.|cls_token$|pos_embed$)"),
    ("attention", r"^backbone\.blocks\.\d+\.(norm1|attn|ls1)\."),
    ("experts", r"^backbone\.blocks\.\d+\.mlp\.(experts|added_experts)\."),
    ("routers (shared)", r"^backbone\.blocks\.\d+\.(mlp|attn)\.router\.gates\.shared\."),
    ("non-expert MLPs", r"^backbone\.(blocks\.\d+\.(norm2|ls2|mlp\.fc\d)\.|norm\.)"),
    ("pixel decoder", r"^pixel_decoder\."),
    ("queries", r"^decoder\.(query_embed|query_pos)$"),
    ("query decoder", r"^decoder\."),
)
CONFLICT = -0.05  # a cosine below this is reported as a conflict (random directions give ~0)


def group_of(name: str) -> str | None:
    """The shared group of a parameter name (None: owned by one task, or not grouped)."""
    if re.search(r"\.router\.(gates|noise)\.(?!shared\.)|\.router\.task_embed\.|^backbone\.task_embed\.|^heads\.|"
                 r"\.per_task\.", name):
        return None
    for group, pattern in SHARED_GROUPS:
        if re.search(pattern, name):
            return group
    return None


def shared_groups(model: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """The trainable parameters of each shared group, in the model's parameter order."""
    groups: dict[str, list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        group = group_of(name)
        if group is not None and p.requires_grad:
            groups.setdefault(group, []).append(p)
    return groups


def task_gradients(model, task: str, batches: list) -> dict[str, torch.Tensor]:
    """The gradient of ``task``'s training loss (mean over ``batches``), flattened per shared
    group ``{group: [P]}``; a group the task does not reach has zeros."""
    model.train()
    model.zero_grad(set_to_none=True)
    for images, targets in batches:
        out = model(images, task, targets=targets)
        (model.task_loss(task, out, targets)["loss"] / len(batches)).backward()
    flat = {group: torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).float()
                              for p in params]) for group, params in shared_groups(model).items()}
    model.zero_grad(set_to_none=True)
    return flat


def routing_load(routing: list[RoutingOutput], num_experts: Mapping[str, int]) -> dict[str, dict]:
    """Per MoE layer: the share of selections of the task's most used expert, how many experts
    take 90% of its selections, and the mean combine weight of each of the k choices (a last
    choice near 0 means the task computes with fewer experts than top_k)."""
    out = {}
    for layer in dict.fromkeys(r.layer for r in routing):
        rs = [r for r in routing if r.layer == layer]
        counts = sum(r.selection_counts(num_experts[layer]) for r in rs).double()
        share = (counts / counts.sum()).sort(descending=True).values
        weights = torch.cat([r.weights_TK.detach().float() for r in rs])
        out[layer] = {"top_expert_share": float(share[0]),
                      "experts_for_90pct": int((share.cumsum(0) < 0.9 - 1e-9).sum()) + 1,
                      "mean_weight_per_choice": [round(float(w), 4) for w in weights.mean(0)],
                      "tokens_with_last_weight_below_0.05": float((weights[:, -1] < 0.05).float().mean())}
    return out


def diagnose(model, datasets: Mapping[str, object], batch_size: int = 8, num_batches: int = 4,
             seed: int = 0) -> dict:
    """``{"groups": {group: {"norm": {task: x}, "cosine": {"a|b": x}}}, "routing": {task: ...},
    "batches": n}`` on ``num_batches`` fixed training batches per task."""
    tasks = list(datasets)
    grads, routing = {}, {}
    for task in tasks:
        batches = list(iterate_batches(fixed_subset(datasets[task], batch_size * num_batches, seed), batch_size,
                                       num_batches))
        grads[task] = task_gradients(model, task, batches)
        model.eval()
        with torch.no_grad():
            seen = [r for images, targets in batches
                    for r in model(images, task, return_routing=True, targets=targets)[1]]
        routing[task] = routing_load(seen, model.backbone.moe_layers())
    groups = {}
    for group in dict.fromkeys(g for t in tasks for g in grads[t]):
        norms = {t: float(grads[t][group].norm()) for t in tasks}
        cos = {}
        for a, b in itertools.combinations(tasks, 2):
            if norms[a] > 0 and norms[b] > 0:
                cos[f"{a}|{b}"] = float(torch.dot(grads[a][group], grads[b][group]) / (norms[a] * norms[b]))
        groups[group] = {"size": int(grads[tasks[0]][group].numel()), "norm": norms, "cosine": cos}
    return {"groups": groups, "routing": routing, "batches": num_batches, "batch_size": batch_size}


def loss_curves(log_file: Path, tail: int = 100) -> dict[str, dict]:
    """Per task, the training loss over steps from a run's ``train_log.jsonl``, and its mean over
    the last ``tail`` steps the task trained in."""
    steps: dict[str, list] = {}
    for line in Path(log_file).read_text().splitlines():
        rec = json.loads(line)
        for task, losses in rec.get("task_losses", {}).items():
            steps.setdefault(task, []).append((rec["step"], losses["loss"]))
    return {t: {"steps": [s for s, _ in v], "loss": [x for _, x in v],
                "final": sum(x for _, x in v[-tail:]) / len(v[-tail:])} for t, v in steps.items()}


def findings(report: dict) -> list[str]:
    """Plain sentences naming where tasks fight: negative cosines (worst first), tasks that use
    fewer experts than they choose, and tasks whose loss ends above their dense run's."""
    out = []
    fights = sorted((c, group, pair) for group, g in report["groups"].items() for pair, c in g["cosine"].items()
                    if c < CONFLICT)
    for c, group, pair in fights:
        a, b = pair.split("|")
        out.append(f"{a} and {b} pull {group} in opposing directions (cosine {c:+.2f})")
    for task, layers in report["routing"].items():
        thin = [layer for layer, r in layers.items() if r["tokens_with_last_weight_below_0.05"] > 0.5]
        if thin:
            out.append(f"{task} gives its last expert choice a weight below 0.05 on most tokens in "
                       f"{', '.join(thin)}: it computes with fewer experts than top_k there")
    for task, c in (report.get("curves") or {}).items():
        if "dense_final" in c and c["final"] > c["dense_final"]:
            out.append(f"{task}'s training loss ends {c['final'] / c['dense_final'] - 1:+.0%} above its dense run's "
                       f"({c['final']:.3f} vs {c['dense_final']:.3f})")
    return out or ["no shared group with a negative cosine below -0.05, and every task uses its top_k experts"]


def format_report(report: dict) -> str:
    tasks = list(report["routing"])
    pairs = [f"{a}|{b}" for a, b in itertools.combinations(tasks, 2)]
    lines = [f"gradient of each task's training loss on {report['batches']} batches of {report['batch_size']}, "
             "per shared parameter group", "",
             f"{'group':<18}{'params':>10}" + "".join(f"{'|g| ' + t:>12}" for t in tasks)
             + "".join(f"{'cos ' + p.replace('|', '-'):>14}" for p in pairs), "-" * (28 + 12 * len(tasks) + 14 * len(pairs))]
    for group, g in report["groups"].items():
        lines.append(f"{group:<18}{g['size']:>10,}" + "".join(f"{g['norm'][t]:>12.4f}" for t in tasks)
                     + "".join(f"{g['cosine'][p]:>+14.3f}" if p in g["cosine"] else f"{'-':>14}" for p in pairs))
    lines += ["", "routing per task and MoE layer: top expert's share, experts for 90% of selections, mean weight per choice"]
    for task, layers in report["routing"].items():
        for layer, r in layers.items():
            lines.append(f"  {task:<8}{layer:<16}{r['top_expert_share']:>6.0%}{r['experts_for_90pct']:>4}   "
                         + " / ".join(f"{w:.2f}" for w in r["mean_weight_per_choice"]))
    curves = report.get("curves") or {}
    if curves:
        lines += ["", "training loss, mean of the last 100 steps of each task: this run vs its dense run"]
        for task, c in curves.items():
            dense = f"{c['dense_final']:.4f}" if "dense_final" in c else "-"
            lines.append(f"  {task:<8}{c['final']:>10.4f}{dense:>10}")
    lines += ["", "where tasks fight:"] + [f"  - {f}" for f in findings(report)]
    return "\n".join(lines)


def plot_curves(curves: Mapping[str, dict], path: Path) -> Path:
    """Each task's training loss (smoothed) against its dense run's, one panel per task."""
    from ..plotting import pyplot, save_figure
    plt = pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.2), squeeze=False)
    for ax, (task, c) in zip(axes[0], curves.items()):
        for label, steps, loss in (("generalist", c["steps"], c["loss"]),
                                   ("dense", c.get("dense_steps"), c.get("dense_loss"))):
            if steps:
                k = max(1, len(loss) // 50)
                smooth = [sum(loss[max(0, i - k):i + 1]) / len(loss[max(0, i - k):i + 1]) for i in range(len(loss))]
                ax.plot(steps, smooth, label=label)
        ax.set(title=task, xlabel="step", ylabel="training loss", yscale="log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def diagnose_run(run: str | Path, dense_runs: list[str | Path] = (), num_batches: int = 4,
                 batch_size: int | None = None, out: str | Path | None = None, seed: int = 0) -> tuple[dict, Path]:
    """The whole diagnosis of a training run directory: gradients per shared group on its training
    data (training transforms), routing per task, loss curves against the dense single-task runs
    (matched by their task); writes ``transfer.json`` and ``transfer_curves.png`` into ``out``
    (default: the run directory)."""
    from .builders import build_dataset, load_generalist
    from .report import write_json
    model, model_file, cfg = load_generalist(run)
    if cfg is None:
        raise ValueError(f"{model_file} has no config.json beside it; pass the training run directory")
    if len(model.tasks) < 2:
        raise ValueError(f"{run} trained one task ({model.tasks[0]}); the diagnosis compares tasks of a generalist")
    torch.manual_seed(seed)
    datasets = {t: build_dataset(t, {**model.spec(t).config(), **cfg["tasks"].get(t, {})}, cfg["data"], "train", True)
                for t in model.tasks}
    bs = batch_size or min(int(cfg["tasks"][t]["batch_size"]) for t in model.tasks)
    report = diagnose(model, datasets, bs, num_batches, seed)
    run_dir = model_file.parent
    curves = loss_curves(run_dir / "train_log.jsonl") if (run_dir / "train_log.jsonl").is_file() else {}
    for dense in map(Path, dense_runs):
        log, dcfg = dense / "train_log.jsonl", dense / "config.json"
        if not log.is_file() or not dcfg.is_file():
            raise FileNotFoundError(f"dense run {dense} has no train_log.jsonl and config.json (a tools/train.py run)")
        for task, c in loss_curves(log).items():
            if task in curves:
                curves[task].update(dense_steps=c["steps"], dense_loss=c["loss"], dense_final=c["final"])
    report["curves"] = {t: {k: v for k, v in c.items()} for t, c in curves.items()}
    report["findings"] = findings(report)
    out = Path(out) if out else run_dir
    write_json(out / "transfer.json", {**report, "curves": {t: {k: v for k, v in c.items() if "final" in k}
                                                               for t, c in curves.items()}})
    if curves:
        plot_curves(curves, out / "transfer_curves.png")
    return report, out
