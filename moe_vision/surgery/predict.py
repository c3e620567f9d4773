"""Single-image prediction for a full model or a bundle: JSON-ready predictions and a picture."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..data import build_transforms, read_image
from ..tasks import GeneralistModel


@torch.no_grad()
def predict_image(model: GeneralistModel, task: str, path: str | Path, class_names: list[str] | None = None,
                  score_threshold: float = 0.3) -> tuple[dict, Image.Image]:
    """Predictions for one image file, in its own pixel coordinates, and an overlay picture.
    Class names come from ``class_names``, else from the model's config (recorded at training)."""
    spec = model.spec(task)
    image = read_image(Path(path))
    h, w = image.shape[-2:]
    size = int(model.backbone.config["img_size"])
    x = build_transforms("cls", False, size)(image)  # resize + normalise; no targets to carry
    model.eval()
    out = model(x[None], task)
    canvas = Image.fromarray(image.permute(1, 2, 0).numpy()).convert("RGB")
    class_names = class_names or spec.options.get("class_names")
    name = (lambda i: class_names[i] if class_names and i < len(class_names) else str(i))
    if spec.type_name == "cls":
        probs = out["logits"][0].softmax(-1)
        top = probs.topk(min(5, len(probs)))
        result = {"top5": [{"label": name(int(i)), "score": float(p)} for p, i in zip(top.values, top.indices)]}
        ImageDraw.Draw(canvas).text((2, 2), result["top5"][0]["label"], fill=(255, 255, 0))
    elif spec.type_name == "det":
        p = spec.postprocess(out, [{"orig_size": torch.tensor([h, w])}])[0]
        keep = p["scores"] >= score_threshold
        result = {"detections": [{"label": name(int(c)), "score": float(s), "box_xyxy": [round(float(v), 1) for v in b]}
                                 for b, s, c in zip(p["boxes"][keep], p["scores"][keep], p["labels"][keep])]}
        draw = ImageDraw.Draw(canvas)
        for d in result["detections"]:
            draw.rectangle(d["box_xyxy"], outline=(255, 255, 0))
            draw.text((d["box_xyxy"][0] + 1, d["box_xyxy"][1] + 1), d["label"], fill=(255, 255, 0))
    elif spec.type_name == "seg":
        labels = spec.semantic_probs(out, (h, w)).argmax(1)[0].numpy()
        result = {"classes_present": sorted(int(c) for c in np.unique(labels)), "mask_shape": [h, w]}
        palette = np.random.default_rng(0).integers(0, 255, size=(max(256, labels.max() + 1), 3))
        canvas = Image.blend(canvas, Image.fromarray(palette[labels].astype(np.uint8)), 0.5)
        result["mask"] = labels.tolist()
    elif spec.type_name == "depth":
        depth = spec.postprocess(out, [{}])[0]
        depth = torch.nn.functional.interpolate(depth[None, None], size=(h, w), mode="bilinear")[0, 0].numpy()
        result = {"depth_m": {"min": float(depth.min()), "max": float(depth.max()), "mean": float(depth.mean())}}
        scaled = ((depth - depth.min()) / max(1e-6, float(np.ptp(depth))) * 255).astype(np.uint8)
        canvas = Image.fromarray(scaled).convert("RGB")
    else:
        raise ValueError(f"no picture defined for task type {spec.type_name!r}")
    return {"task": task, "image": str(path), **result}, canvas
