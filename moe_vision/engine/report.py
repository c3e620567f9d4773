"""What a run directory holds besides the checkpoint: metrics, expert usage (JSON + heatmap), tables."""
from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Mapping, Sequence

from ..io_utils import atomic_path
from ..moe import ExpertUsage
from ..plotting import pyplot, save_figure


def write_json(path: Path, obj) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2))
    return path


def write_usage(out_dir: Path, usage: ExpertUsage, **extra) -> None:
    """``expert_usage.json`` (with ``extra`` keys) and, when there are MoE layers, ``expert_usage.png``."""
    write_json(Path(out_dir) / "expert_usage.json", {**usage.to_dict(), **extra})
    if usage.layers:
        plot_usage(usage, Path(out_dir) / "expert_usage.png")


def write_run_reports(out_dir: Path, metrics: dict, chance: dict, usage: ExpertUsage) -> None:
    """The evaluation files of a run directory: metrics, chance levels, expert usage."""
    write_json(Path(out_dir) / "metrics.json", metrics)
    write_json(Path(out_dir) / "chance_metrics.json", chance)
    write_usage(out_dir, usage)


def plot_usage(usage: ExpertUsage, path: Path) -> Path:
    """One heatmap per MoE layer: tasks x experts, colour = selection frequency; for a model trained
    with an expert budget, a frame around each expert a task may choose (what its bundle keeps)."""
    plt = pyplot()
    freq = usage.frequency().numpy()
    L = len(usage.layers)
    cols = min(4, max(1, L))
    rows = -(-L // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 0.5 * len(usage.tasks) * rows + 1.2 * rows),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= L:
            ax.axis("off")
            continue
        im = ax.imshow(freq[i], vmin=0, vmax=max(1e-9, freq.max()), cmap="viridis", aspect="auto")
        ax.set_title(usage.layers[i], fontsize=8)
        ax.set_yticks(range(len(usage.tasks)), usage.tasks, fontsize=7)
        ax.set_xticks(range(freq.shape[-1]), range(freq.shape[-1]), fontsize=6)
        ax.set_xlabel("expert", fontsize=7)
        for ti, task in enumerate(usage.tasks):
            for e in (usage.allowed or {}).get(usage.layers[i], {}).get(task, []):
                ax.add_patch(plt.Rectangle((e - 0.5, ti - 0.5), 1, 1, fill=False, edgecolor="white", lw=1.2))
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="selection frequency")
    return save_figure(fig, path, dpi=110)


def usage_summary(usage: ExpertUsage) -> list[str]:
    """One line per layer: each task's most used experts and their share of selections."""
    freq = usage.frequency()
    lines = []
    for li, layer in enumerate(usage.layers):
        parts = []
        for si, task in enumerate(usage.tasks):
            top = freq[li, si].topk(min(3, freq.shape[-1]))
            parts.append(f"{task}: " + ",".join(f"{int(e)}({v:.0%})" for v, e in zip(top.values, top.indices)))
        lines.append(f"{layer:<16} " + "  ".join(parts))
    return lines


def metrics_table(metrics: Mapping[str, Mapping[str, float]], chance: Mapping[str, Mapping[str, float]] | None = None,
                  baseline: Mapping[str, Mapping[str, float]] | None = None, baseline_name: str = "baseline") -> str:
    """Plain-text table: task, metric, value (and chance, baseline columns when given)."""
    head = ["task", "metric", "value"] + (["chance"] if chance else []) + ([baseline_name] if baseline else [])
    rows = []
    for task, ms in metrics.items():
        for m, v in ms.items():
            row = [task, m, f"{v:.4f}"]
            if chance:
                row.append(f"{chance.get(task, {}).get(m, float('nan')):.4f}")
            if baseline:
                row.append(f"{baseline.get(task, {}).get(m, float('nan')):.4f}")
            rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)] if rows else [len(h) for h in head]
    out = [" | ".join(h.ljust(w) for h, w in zip(head, widths)), "-+-".join("-" * w for w in widths)]
    out += [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def load_run_metrics(run_dir: Path) -> tuple[dict, dict]:
    """(metrics, chance) of a run directory, with a clear error when it is not one."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.json; is it a finished training run?")
    chance_path = run_dir / "chance_metrics.json"
    chance = json.loads(chance_path.read_text()) if chance_path.is_file() else {}
    return json.loads(path.read_text()), chance


# Metrics that are not fractions in [0, 1] (depth errors in metres): shown as they are, not in percent.
ABSOLUTE_METRICS = ("rmse", "absrel")


def format_metric(metric: str, value: float | None, signed: bool = False) -> str:
    """A metric for a table: fractions in percent with one decimal, depth errors in metres (3 decimals)."""
    if value is None:
        return "-"
    if metric in ABSOLUTE_METRICS:
        return f"{value:+.3f}" if signed else f"{value:.3f}"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


# The metric that picks the best of several runs of one task (a learning-rate sweep), and whether higher wins.
SELECTION_METRIC = {"cls": ("top1", True), "det": ("mAP", True), "seg": ("mIoU", True), "depth": ("rmse", False)}


def best_single_task_runs(runs: Sequence[Path]) -> dict[str, dict]:
    """Per task, the best of single-task runs by :data:`SELECTION_METRIC` on their evaluation split:
    ``{task: {"run", "metrics", "lr", "sweep": [(run, lr, value), ...]}}``."""
    by_task: dict[str, list] = {}
    for run in runs:
        metrics, _ = load_run_metrics(run)
        if len(metrics) != 1:
            raise ValueError(f"{run} holds {len(metrics)} tasks {sorted(metrics)}; expected a single-task run")
        (task, ms), = metrics.items()
        cfg_path = Path(run) / "config.json"
        lr = json.loads(cfg_path.read_text())["train"].get("lr") if cfg_path.is_file() else None
        by_task.setdefault(task, []).append((Path(run), lr, ms))
    best = {}
    for task, entries in by_task.items():
        metric, higher = SELECTION_METRIC.get(task, (next(iter(entries[0][2])), True))
        run, lr, ms = (max if higher else min)(entries, key=lambda e: e[2][metric])
        best[task] = {"run": run, "metrics": ms, "lr": lr, "metric": metric,
                      "sweep": [(str(r), l, m[metric]) for r, l, m in entries]}
    return best


def comparison_table(multi: Mapping[str, Mapping[str, float]], singles: Mapping[str, Mapping[str, float]],
                     chance: Mapping[str, Mapping[str, float]]) -> tuple[str, list[dict]]:
    """Multi-task model vs single-task baselines, per task and metric: fractions in percent (deltas
    in points), depth errors in metres."""
    rows = []
    for task, ms in multi.items():
        for m, v in ms.items():
            if task not in singles or m not in singles[task]:
                continue
            s = singles[task][m]
            rows.append({"task": task, "metric": m, "multi_task_moe": v, "single_task_dense": s,
                         "delta_points": 100 * (v - s) if m not in ABSOLUTE_METRICS else None,
                         "delta": v - s, "chance": chance.get(task, {}).get(m)})
    head = ["task", "metric", "MoE multi-task", "dense single-task", "delta", "chance"]
    body = [[r["task"], r["metric"] + (" (m)" if r["metric"] == "rmse" else ""),
             format_metric(r["metric"], r["multi_task_moe"]), format_metric(r["metric"], r["single_task_dense"]),
             format_metric(r["metric"], r["delta"], signed=True), format_metric(r["metric"], r["chance"])]
            for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(head, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines), rows


def seed_summary(groups: Mapping[str, Sequence[Path]]) -> tuple[str, list[dict]]:
    """Mean and half-range of every metric over each group of runs (the seeds of one setting).

    ``groups`` maps a name to run directories. Every run of a group must hold the same tasks and
    metrics (a group that mixes settings is refused, naming the run). Returns a markdown table
    (values as stored in ``metrics.json``) and one row per group, task and metric.
    """
    rows = []
    for name, runs in groups.items():
        if not runs:
            raise ValueError(f"group {name!r} holds no run directory")
        loaded = [(Path(r), *load_run_metrics(r)) for r in runs]
        first_run, first, chance = loaded[0]
        names = _metric_names(first)
        for run, metrics, _ in loaded[1:]:
            if _metric_names(metrics) != names:
                raise ValueError(f"{run} holds metrics {_metric_names(metrics)}, but {first_run} of the same "
                                 f"group {name!r} holds {names}; one group = one setting")
        for task, ms in first.items():
            for metric in ms:
                values = [float(m[task][metric]) for _, m, _ in loaded]
                c = chance.get(task, {}).get(metric)
                rows.append({"group": name, "task": task, "metric": metric, "runs": [str(r) for r, _, _ in loaded],
                             "values": values, "mean": sum(values) / len(values),
                             "half_range": (max(values) - min(values)) / 2, "chance": c})
    head = ["group", "task", "metric", "runs", "mean ± half-range", "per run", "chance"]
    body = [[r["group"], r["task"], r["metric"], str(len(r["values"])), f"{r['mean']:.4f} ± {r['half_range']:.4f}",
             " / ".join(f"{v:.4f}" for v in r["values"]), "-" if r["chance"] is None else f"{r['chance']:.4f}"]
            for r in rows]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(b) + " |" for b in body]
    return "\n".join(lines), rows


def _metric_names(metrics: Mapping[str, Mapping[str, float]]) -> str:
    return ", ".join(sorted(f"{t}/{m}" for t, ms in metrics.items() for m in ms))


def parse_run_groups(items: list[str]) -> dict[str, list[Path]]:
    """Command-line groups of runs: ``NAME=PATTERN`` starts a group, a bare path joins the one before."""
    groups: dict[str, list[Path]] = {}
    current = None
    for item in items:
        name, sep, pattern = item.partition("=")
        if sep and name and "/" not in name:
            current = name
            groups.setdefault(current, [])
        elif current is None:
            raise ValueError(f"{item!r} comes before any group; start with NAME=PATTERN, e.g. scratch='runs/x_s*'")
        else:
            pattern = item
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not matches:
            raise ValueError(f"group {current!r}: {pattern!r} matches no run directory")
        groups[current] += [Path(m) for m in matches]
    return groups


def truncate_log(path: Path, step: int) -> None:
    """Drop the records after ``step`` from a JSON-lines log (a run resumed from that step's
    checkpoint repeats them), so the log reads as one uninterrupted run."""
    path = Path(path)
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        with atomic_path(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))
