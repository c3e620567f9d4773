"""``reconstructions.png``: input, masked input and reconstruction for a few validation images."""
from __future__ import annotations

from pathlib import Path

import torch

from ..data import collate
from ..plotting import pyplot, save_figure, to_rgb
from .masking import patchify, unpatchify


@torch.no_grad()
def plot_reconstructions(model, task: str, dataset, path: Path, count: int = 6) -> Path:
    """One row per image. A normalised-pixel prediction is shown in the visible image's units:
    each masked patch gets the predicted pattern scaled to the true patch's mean and spread (the
    target hides exactly those two numbers)."""
    plt = pyplot()
    was_training = model.training
    model.eval()
    spec = model.spec(task)
    p = int(spec.options["patch_size"])
    items = [dataset[i * max(1, len(dataset) // count)] for i in range(min(count, len(dataset)))]
    masked, targets = collate(items)
    device = next(model.parameters()).device
    preds = spec.postprocess(model(masked.to(device), task, targets=targets), targets)
    fig, axes = plt.subplots(len(items), 3, figsize=(4.8, 1.7 * len(items)), squeeze=False)
    for row, (image, target, pred) in enumerate(zip(masked, targets, preds)):
        mask = target["mask"]
        if isinstance(pred, dict):  # two-view (hybrid) pre-training: show view 0
            image, mask, pred = image[0], mask[0], pred["mim"][0]
        full = target["image"]
        grid = (full.shape[-2] // p, full.shape[-1] // p)
        patches = patchify(full, p)
        recon = patches.clone()
        true = patches[mask]
        if spec.options.get("norm_pix", True):
            pred = pred * true.std(-1, unbiased=False, keepdim=True) + true.mean(-1, keepdim=True)
        recon[mask] = pred.to(recon.dtype)
        for ax, img, title in zip(axes[row], (full, image, unpatchify(recon, p, grid)),
                                  ("input", "masked input", "reconstruction")):
            ax.imshow(to_rgb(img))
            ax.set_title(title, fontsize=7)
            ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    model.train(was_training)
    return save_figure(fig, Path(path))
