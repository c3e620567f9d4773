"""GLID-style masked image modelling posed as queries to the shared decoder.

Every masked patch is one question to the query decoder: its content is the shared mask query
(the decoder's learned query 1) and its position the sine embedding of the patch centre, the same
code the memory tokens' positions use. A [CLS] query (the decoder's learned query 0, the one
classification reads) is asked alongside. One linear layer regresses each masked patch's
(normalised) pixels from its answer: the only parameter that exists for pre-training alone.
Fine-tuning keeps the encoder, the decoder and its queries, and replaces this layer by the
tasks' heads.

Legend: B batch, Nm masked patches per image, P = p*p*3 values per patch, D decoder dim.
"""
from __future__ import annotations

import torch
from torch import nn

from ..decoder.pixel_decoder import grid_centres
from ..decoder.position_queries import ask_positions
from ..tasks.base import Evaluator, Task, register_task


class ReconstructionEvaluator(Evaluator):
    """Mean squared error over the masked patches' (normalised) pixels; an input-blind predictor
    of the patch mean scores 1.0 on normalised targets."""

    def __init__(self) -> None:
        self.sq, self.n = 0.0, 0

    def update(self, preds: list[torch.Tensor], targets: list[dict]) -> None:
        for pred_NmP, t in zip(preds, targets):
            want = t["patches"][t["mask"]].to(pred_NmP.device)
            self.sq += float(((pred_NmP.float() - want) ** 2).sum())
            self.n += want.numel()

    def compute(self) -> dict[str, float]:
        return {"mse": self.sq / max(1, self.n)}


def masked_indices(masks_BN: torch.Tensor, device) -> torch.Tensor:
    """``[B, Nm]`` indices of each image's masked patches (every image hides the same number)."""
    masks = masks_BN.to(device)
    counts = masks.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"images in a batch hide different numbers of patches {counts.tolist()}")
    return masks.nonzero()[:, 1].reshape(masks.shape[0], int(counts[0]))


ENCODER_INPUTS = ("visible", "full")


def check_encoder_input(task: str, value: str) -> str:
    if value not in ENCODER_INPUTS:
        raise ValueError(f"tasks.{task}.encoder={value!r}; expected one of {', '.join(ENCODER_INPUTS)}")
    return value


def visible_indices(masks_BN: torch.Tensor, device) -> torch.Tensor:
    """``[B, Nv]`` indices of each image's visible patches (the complement of :func:`masked_indices`)."""
    return masked_indices(~masks_BN.bool(), device)


def ask_masked_patches(decoder, feats, image_size, p: int, idx_BNm: torch.Tensor) -> torch.Tensor:
    """The decoder's answers ``[B, 1 + Nm, D]`` to the [CLS] query and one mask query per masked
    patch (content: the shared mask query; position: the sine embedding of the patch centre)."""
    centres_BNm2 = grid_centres((image_size[0] // p, image_size[1] // p), idx_BNm.device)[idx_BNm]
    return ask_positions(decoder, feats, centres_BNm2, (p / image_size[1], p / image_size[0]), with_cls=True)


def reconstruction_loss(pred_BNmP: torch.Tensor, patches_BNP: torch.Tensor, idx_BNm: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the predictions and the masked patches' targets."""
    want = patches_BNP.to(pred_BNmP.device)
    want = torch.gather(want, 1, idx_BNm[..., None].expand(-1, -1, want.shape[-1]))
    return ((pred_BNmP.float() - want) ** 2).mean()


@register_task
class MaskedImageModelingTask(Task):
    """Task type ``mim``. Options: ``patch_size`` (the backbone's), ``mask_ratio``, ``norm_pix``,
    ``encoder`` (``visible``: the backbone's blocks see the visible patches only, MAE-style;
    ``full``: every patch, the masked ones zeroed, SimMIM-style)."""

    type_name, primary_metric = "mim", "mse"
    queries_from_targets = True  # the masked positions are the questions, also at evaluation

    def __init__(self, name: str, num_classes: int = 0, loss_weights: dict | None = None, **options) -> None:
        super().__init__(name, num_classes, loss_weights, **options)
        check_encoder_input(name, self.options.setdefault("encoder", "visible"))

    def visible_patches(self, targets, device):
        if self.options["encoder"] != "visible" or targets is None:
            return None
        return visible_indices(torch.stack([t["mask"] for t in targets]), device)

    def build_head(self, dim: int) -> nn.Module:
        return nn.Linear(dim, int(self.options["patch_size"]) ** 2 * 3)

    def check_decoder(self, num_queries: int) -> None:
        if num_queries < 2:
            raise ValueError(f"masked image modelling needs decoder.num_queries >= 2 (a [CLS] and a mask query), "
                             f"got {num_queries}")

    def forward(self, head, decoder, feats, image_size, deep_supervision=False, targets=None):
        if targets is None:
            raise ValueError("masked image modelling needs the masks (targets) at every forward")
        idx_BNm = masked_indices(torch.stack([t["mask"] for t in targets]), feats.memory_BMD.device)
        answers_BQD = ask_masked_patches(decoder, feats, image_size, int(self.options["patch_size"]), idx_BNm)
        return {"pred_BNmP": head(answers_BQD[:, 1:]), "cls_BD": answers_BQD[:, 0], "idx_BNm": idx_BNm}

    def loss(self, outputs, targets):
        mse = reconstruction_loss(outputs["pred_BNmP"], torch.stack([t["patches"] for t in targets]),
                                  outputs["idx_BNm"])
        return {"loss": mse, "mim": mse}

    def postprocess(self, outputs, targets):
        return list(outputs["pred_BNmP"].float().detach().cpu())

    def evaluator(self, dataset) -> Evaluator:
        return ReconstructionEvaluator()

    def chance_predictions(self, dataset, targets):
        return [torch.zeros_like(t["patches"][t["mask"]]) for t in targets]

    def write_pictures(self, model, task: str, dataset, run_dir) -> None:
        from .visualize import plot_reconstructions
        plot_reconstructions(model, task, dataset, run_dir / "reconstructions.png")
