"""The downstream rows as a table (mean over seeds, each seed's value beside it) and two plots:
metric against trainable parameters and against FLOPs per image."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Sequence

PRIMARY = {"fashion-mnist": "top1", "trees": "mAP50"}


def _group(rows: Sequence[dict]) -> dict:
    groups: dict = defaultdict(list)
    for r in rows:
        groups[(r["dataset"], r["labels"], r["metric"], r["method"])].append(r)
    return groups


def table(rows: Sequence[dict], method_order: Sequence[str]) -> str:
    """Markdown: one block per (dataset, labels, metric), a line per method."""
    groups = _group(rows)
    blocks = sorted({k[:3] for k in groups}, key=lambda k: (k[0], k[1] or 0, k[2]))
    out = []
    for ds, labels, metric in blocks:
        out += [f"**{ds}**" + (f", {labels:,} training labels" if labels else "") + f": {metric} (%)", "",
                "| method | mean | per seed | trainable | parameters | GFLOPs / image | train s (mean) |",
                "|---|---:|---|---:|---:|---:|---:|"]
        for m in method_order:
            rs = sorted(groups.get((ds, labels, metric, m), []), key=lambda r: r["seed"])
            if not rs:
                continue
            per_seed = " / ".join(f"{r['value']:.1f}" for r in rs) + f" (seeds {', '.join(str(r['seed']) for r in rs)})"
            out.append(f"| {m} | {mean(r['value'] for r in rs):.1f} | {per_seed} | {rs[0]['trainable_params']:,} | "
                       f"{rs[0]['params']:,} | {rs[0]['flops_per_image'] / 1e9:.3f} | "
                       f"{mean(r['train_seconds'] for r in rs):.0f} |")
        out.append("")
    return "\n".join(out)


def plot(rows: Sequence[dict], path: Path) -> Path:
    """Primary metric (mean over seeds) against trainable parameters and against FLOPs per image,
    one panel pair per (dataset, labels)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = _group([r for r in rows if r["metric"] == PRIMARY.get(r["dataset"], r["metric"])])
    blocks = sorted({k[:2] for k in groups}, key=lambda k: (k[0], k[1] or 0))
    fig, axes = plt.subplots(len(blocks), 2, figsize=(11, 3.6 * len(blocks)), squeeze=False)
    for (ds, labels), ax_row in zip(blocks, axes):
        for (d, lab, metric, method), rs in groups.items():
            if (d, lab) != (ds, labels):
                continue
            y = mean(r["value"] for r in rs)
            for ax, x in zip(ax_row, (rs[0]["trainable_params"], rs[0]["flops_per_image"] / 1e9)):
                ax.scatter(x, y)
                ax.annotate(method, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        title = ds + (f", {labels:,} labels" if labels else "")
        ax_row[0].set(xscale="log", xlabel="trainable parameters", ylabel=f"{PRIMARY.get(ds, '')} (%)", title=title)
        ax_row[1].set(xlabel="GFLOPs per image (forward)", ylabel=f"{PRIMARY.get(ds, '')} (%)", title=title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
