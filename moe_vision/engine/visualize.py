"""Pictures of a run: ``curves.png`` (training losses and validation metrics over steps) and
``predictions.png`` (validation images with predictions beside the ground truth)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..data import collate
from ..plotting import pyplot, save_figure, to_rgb


def _smooth(values: Sequence[float], beta: float = 0.9) -> list[float]:
    out, avg = [], None
    for v in values:
        avg = v if avg is None else beta * avg + (1 - beta) * v
        out.append(avg)
    return out


def plot_curves(train_rows: Sequence[Mapping], val_rows: Sequence[Mapping], primary: Mapping[str, str],
                path: Path) -> Path:
    """Left: each task's training loss (smoothed, log scale) per step. Right: each task's
    validation metrics per step (the primary metric solid, others dashed)."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    tasks = sorted({t for r in train_rows for t in r.get("task_losses", {})})
    for task in tasks:
        pts = [(r["step"], r["task_losses"][task]["loss"]) for r in train_rows if task in r.get("task_losses", {})]
        if pts:
            steps, losses = zip(*pts)
            left.plot(steps, _smooth(losses), label=task)
    left.set(xlabel="step", ylabel="training loss (smoothed)", yscale="log", title="training loss")
    left.legend(fontsize=8)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, task in enumerate(sorted({t for r in val_rows for t in r["metrics"]})):
        rows = [r for r in val_rows if task in r["metrics"]]
        for metric in rows[-1]["metrics"][task]:
            steps = [r["step"] for r in rows if metric in r["metrics"][task]]
            vals = [r["metrics"][task][metric] for r in rows if metric in r["metrics"][task]]
            main = metric == primary.get(task)
            right.plot(steps, vals, "-o" if main else "--", color=colours[i % len(colours)], markersize=3,
                       alpha=1.0 if main else 0.5, label=f"{task} {metric}")
    right.set(xlabel="step", ylabel="validation metric", title="validation (primary metrics solid)")
    right.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return save_figure(fig, Path(path))


def _class_name(spec, i: int) -> str:
    names = spec.options.get("class_names")
    return names[i] if names and 0 <= i < len(names) else str(i)


def _draw_boxes(ax, boxes, labels, spec, colour, scores=None) -> None:
    import matplotlib.patches as patches
    for j, (box, label) in enumerate(zip(boxes, labels)):
        x0, y0, x1, y1 = [float(v) for v in box]
        ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1))
        text = _class_name(spec, int(label)) + (f" {float(scores[j]):.2f}" if scores is not None else "")
        ax.text(x0, y0, text, color=colour, fontsize=5, va="bottom")


@torch.no_grad()
def plot_predictions(model, datasets: Mapping[str, object], path: Path, per_task: int = 4,
                     device: torch.device | str = "cpu", score_threshold: float = 0.3) -> Path:
    """A grid: per task a row of validation images, each with the prediction beside the ground
    truth (cls: top-1 class and score; det: boxes with labels and scores; seg/depth: maps)."""
    plt = pyplot()
    was_training = model.training
    model.eval()
    tasks = list(datasets)
    cols = 2 * per_task
    fig, axes = plt.subplots(len(tasks), cols, figsize=(1.6 * cols, 1.8 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        spec, dataset = model.spec(task), datasets[task]
        step = max(1, len(dataset) // per_task)
        items = [dataset[i * step] for i in range(min(per_task, len(dataset)))]
        images, targets = collate(items)
        preds = spec.postprocess(model(images.to(device), task), targets)
        for j, (image, target, pred) in enumerate(zip(images, targets, preds)):
            ih, iw = [int(v) for v in target.get("input_size", image.shape[-2:])]
            rgb = to_rgb(image[..., :ih, :iw])  # (without the batch's padding)
            a_pred, a_gt = axes[row, 2 * j], axes[row, 2 * j + 1]
            kind = spec.type_name
            if kind == "cls":
                p = pred.softmax(-1)
                a_pred.imshow(rgb)
                a_pred.set_title(f"{_class_name(spec, int(p.argmax()))} {float(p.max()):.2f}", fontsize=6)
                a_gt.imshow(rgb)
                a_gt.set_title(f"true: {_class_name(spec, int(target['label']))}", fontsize=6)
            elif kind == "det":
                oh, ow = [int(v) for v in target["orig_size"]]
                scale = torch.tensor([iw / ow, ih / oh, iw / ow, ih / oh])  # original pixels -> shown image
                keep = pred["scores"] >= score_threshold
                a_pred.imshow(rgb)
                _draw_boxes(a_pred, pred["boxes"][keep] * scale, pred["labels"][keep], spec, "yellow",
                            pred["scores"][keep])
                a_gt.imshow(rgb)
                _draw_boxes(a_gt, torch.as_tensor(target["boxes"]), target["labels"], spec, "cyan")
                a_pred.set_title(f"predicted (score >= {score_threshold})", fontsize=6)
                a_gt.set_title("ground truth", fontsize=6)
            else:
                key = "mask" if kind == "seg" else "depth"
                gt = torch.as_tensor(target[key]).float()
                opts = {"cmap": "tab20", "vmin": 0, "vmax": 19, "interpolation": "nearest"} if kind == "seg" else \
                    {"cmap": "magma", "vmin": float(gt[gt > 0].min()) if (gt > 0).any() else 0, "vmax": float(gt.max())}
                shown = gt.clone()
                if kind == "seg":
                    shown[gt == 255] = float("nan")
                a_pred.imshow(pred.float().numpy(), **opts)
                a_gt.imshow(shown.numpy(), **opts)
                a_pred.set_title("predicted", fontsize=6)
                a_gt.set_title("ground truth", fontsize=6)
            for ax in (a_pred, a_gt):
                ax.set_xticks([]), ax.set_yticks([])
        for ax in axes[row, 2 * len(items):]:
            ax.axis("off")
        axes[row, 0].set_ylabel(task, fontsize=8)
    fig.tight_layout()
    model.train(was_training)
    return save_figure(fig, Path(path))
