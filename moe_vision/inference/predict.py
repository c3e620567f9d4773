"""Single-image prediction for a full model or a bundle: JSON-ready predictions and a picture."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..data import collate, read_image
from ..data.readers import DEFAULT_MAX_PIXELS
from ..tasks import GeneralistModel


def inference_transform(model: GeneralistModel, task: str):
    """The evaluation pipeline of ``task`` as the model was trained: its recorded input size and
    resize mode (aspect ratio kept for det, seg and depth), normalisation."""
    from ..engine.builders import task_transforms
    spec = model.spec(task)
    return task_transforms(task, {**spec.options, "type": spec.type_name},
                           {"img_size": model.backbone.config["img_size"]}, train=False)


@torch.no_grad()
def predict_batch(model: GeneralistModel, task: str, images: list[torch.Tensor], return_routing: bool = False):
    """Postprocessed predictions for decoded images (uint8 ``[3, H, W]``), each in its own pixel
    coordinates: cls logits, det boxes/scores/labels, seg label maps and depth maps at each
    image's original size. Images of different shapes share a padded batch. With
    ``return_routing``, also the MoE layers' :class:`~moe_vision.moe.RoutingOutput` list and the
    batch's canvas ``(H, W)``."""
    transform = inference_transform(model, task)
    x, targets = collate([transform(im, {}) for im in images])
    model.eval()
    device = next(model.parameters()).device
    out, routing = model(x.to(device), task, targets=targets, return_routing=True)
    preds = model.spec(task).postprocess(out, targets)
    return (preds, routing, tuple(x.shape[-2:])) if return_routing else preds


def predict(model: GeneralistModel, task: str, images: list) -> list:
    """Predictions for image files (paths) or decoded images (uint8 ``[3, H, W]``), each in its own
    pixels (see :func:`predict_batch`): ``moe_vision.predict(model, "det", ["photo.jpg"])``."""
    decoded = [read_image(Path(im), max_pixels=DEFAULT_MAX_PIXELS) if isinstance(im, (str, Path)) else im
               for im in images]
    return predict_batch(model, task, decoded)


@torch.no_grad()
def predict_image(model: GeneralistModel, task: str, path: str | Path, class_names: list[str] | None = None,
                  score_threshold: float = 0.3, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[dict, Image.Image]:
    """Predictions for one image file, in its own pixel coordinates, and an overlay picture.
    Class names come from ``class_names``, else from the model's config (recorded at training)."""
    spec = model.spec(task)
    image = read_image(Path(path), max_pixels=max_pixels)
    h, w = image.shape[-2:]
    pred = predict_batch(model, task, [image])[0]
    canvas = Image.fromarray(image.permute(1, 2, 0).numpy()).convert("RGB")
    class_names = class_names or spec.options.get("class_names")
    name = (lambda i: class_names[i] if class_names and i < len(class_names) else str(i))
    if spec.type_name == "cls":
        probs = pred.softmax(-1)
        top = probs.topk(min(5, len(probs)))
        result = {"top5": [{"label": name(int(i)), "score": float(p)} for p, i in zip(top.values, top.indices)]}
        ImageDraw.Draw(canvas).text((2, 2), result["top5"][0]["label"], fill=(255, 255, 0))
    elif spec.type_name == "det":
        keep = pred["scores"] >= score_threshold
        result = {"detections": [{"label": name(int(c)), "score": float(s), "box_xyxy": [round(float(v), 1) for v in b]}
                                 for b, s, c in zip(pred["boxes"][keep], pred["scores"][keep], pred["labels"][keep])]}
        draw = ImageDraw.Draw(canvas)
        for d in result["detections"]:
            draw.rectangle(d["box_xyxy"], outline=(255, 255, 0))
            draw.text((d["box_xyxy"][0] + 1, d["box_xyxy"][1] + 1), d["label"], fill=(255, 255, 0))
    elif spec.type_name == "seg":
        labels = pred.numpy()
        result = {"classes_present": sorted(int(c) for c in np.unique(labels)), "mask_shape": [h, w]}
        palette = np.random.default_rng(0).integers(0, 255, size=(max(256, labels.max() + 1), 3))
        canvas = Image.blend(canvas, Image.fromarray(palette[labels].astype(np.uint8)), 0.5)
        result["mask"] = labels.tolist()
    elif spec.type_name == "depth":
        depth = pred.numpy()
        result = {"depth_m": {"min": float(depth.min()), "max": float(depth.max()), "mean": float(depth.mean())}}
        scaled = ((depth - depth.min()) / max(1e-6, float(np.ptp(depth))) * 255).astype(np.uint8)
        canvas = Image.fromarray(scaled).convert("RGB")
    else:
        raise ValueError(f"no picture defined for task type {spec.type_name!r}")
    return {"task": task, "image": str(path), **result}, canvas


# ---------------------------------------------------------------- folders and batches
RESULT_FILES = {"det": "{task}_results.json", "cls": "{task}_predictions.json", "seg": "annotations",
                "depth": "depth"}


def image_files(inputs: list[str | Path]) -> list[Path]:
    """Image files from files and folders (folders searched recursively, sorted)."""
    from ..data.readers import images_under
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += images_under(item)
        elif item.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f"input {item} does not exist")
    return paths


def coco_image_ids(ann_file: str | Path) -> tuple[dict[str, int], list[int]]:
    """``file_name -> image id`` and the category ids in label order (as the COCO reader maps them)."""
    import json
    data = json.loads(Path(ann_file).read_text())
    ids = {Path(im["file_name"]).name: int(im["id"]) for im in data.get("images", [])}
    return ids, [c["id"] for c in sorted(data.get("categories", []), key=lambda c: c["id"])]


def det_records(pred: dict, image_id, cat_ids: list[int] | None = None) -> list[dict]:
    """One image's detections as COCO results (``bbox`` XYWH in its pixels, ``category_id`` the
    annotation file's id when ``cat_ids`` is given, else the label index)."""
    out = []
    for box, score, label in zip(pred["boxes"].tolist(), pred["scores"].tolist(), pred["labels"].tolist()):
        x0, y0, x1, y1 = box
        out.append({"image_id": image_id, "category_id": cat_ids[label] if cat_ids else int(label),
                    "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                    "score": round(float(score), 5)})
    return out


def cls_top5(logits: torch.Tensor, names: list[str] | None = None) -> list[dict]:
    """The five most probable classes: ``label``, ``name``, ``score`` (softmax probability)."""
    top = logits.float().softmax(-1).topk(min(5, logits.shape[-1]))
    return [{"label": int(c), "name": names[c] if names and c < len(names) else str(c), "score": round(s, 5)}
            for s, c in zip(top.values.tolist(), top.indices.tolist())]


def seg_png_array(labels: torch.Tensor, label_offset: int = 0) -> np.ndarray:
    """A label map as the 8-bit array of an ADE20K-style PNG (label + ``label_offset``)."""
    labels = labels + int(label_offset)
    if int(labels.max()) > 255:
        raise ValueError(f"label {int(labels.max())} does not fit an 8-bit PNG (--label-offset?)")
    return labels.numpy().astype(np.uint8)


def depth_png_array(depth_m: torch.Tensor) -> np.ndarray:
    """A depth map in metres as the 16-bit array of an NYU-style PNG (millimetres, >= 1)."""
    return (depth_m * 1000).round().clamp(1, 65535).numpy().astype(np.uint16)


def _write_png(array: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    tmp.replace(path)


@torch.no_grad()
def predict_folder(model: GeneralistModel, task: str, paths: list[Path], out: str | Path, batch_size: int = 32,
                   coco_ann: str | Path | None = None, label_offset: int = 0, force: bool = False,
                   progress: bool = True, max_pixels: int | None = DEFAULT_MAX_PIXELS, log=None) -> dict:
    """Batched prediction over image files into standard result files under ``out``:

    * det: ``<task>_results.json``, COCO results (``image_id`` from ``coco_ann`` when given, else
      the file name; ``category_id`` the annotation file's id, else the label index; boxes XYWH in
      the image's own pixels);
    * seg: ``annotations/<name>.png``, 8-bit label maps (label + ``label_offset``; 1 for ADE20K's
      reduce-zero-label convention), ADE20K layout;
    * depth: ``depth/<name>.png``, 16-bit PNG in millimetres (NYU layout);
    * cls: ``<task>_predictions.json``, the top-5 classes per file.

    Images are resized as in training (aspect ratio kept for det, seg and depth) and batched with
    padding; every output is in the image's own pixels. A file that cannot be decoded, or has more
    than ``max_pixels`` pixels, is skipped with one line through ``log`` (default: standard error)
    naming it and why (counted in ``skipped``); if none can be read, a ValueError (for a single
    input, its own reason).
    Existing results are refused unless ``force``; JSON is written to a temporary file and renamed.
    """
    import json
    import sys
    from ..progress import progress_bar
    log = log or (lambda m: print(m, file=sys.stderr))
    spec = model.spec(task)
    kind = spec.type_name
    if kind not in RESULT_FILES:
        raise ValueError(f"task {task!r} of type {kind!r}: folder prediction supports {', '.join(RESULT_FILES)}")
    out = Path(out)
    target = out / RESULT_FILES[kind].format(task=task)
    if target.exists() and not force:
        raise FileExistsError(f"{target} already exists; pass --force to replace it")
    ids, cat_ids = coco_image_ids(coco_ann) if coco_ann else (None, None)
    if ids is not None:
        unknown = [p.name for p in paths if p.name not in ids]
        if unknown:
            raise ValueError(f"{coco_ann} has no image entry for {len(unknown)} input file(s), e.g. {unknown[0]}")
    if kind in ("seg", "depth"):
        target.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    names = spec.options.get("class_names")
    results, skipped = [], []
    bar = progress_bar(total=len(paths), desc=f"predict {task}", disable=not progress, unit="img", delay=0.5)
    for start in range(0, len(paths), batch_size):
        images, kept = [], []
        for p in paths[start:start + batch_size]:
            try:
                images.append(read_image(p, max_pixels=max_pixels))
                kept.append(p)
            except ValueError as e:
                if len(paths) == 1:
                    raise
                bar.clear()
                log(f"skipped: {e}")
                skipped.append(str(p))
        bar.update(len(paths[start:start + batch_size]))
        if not images:
            continue
        preds = predict_batch(model, task, images)
        for p, pred in zip(kept, preds):
            if kind == "det":
                results += det_records(pred, ids[p.name] if ids else p.name, cat_ids)
            elif kind == "cls":
                results.append({"file": str(p), "top5": cls_top5(pred, names)})
            elif kind == "seg":
                _write_png(seg_png_array(pred, label_offset), target / f"{p.stem}.png")
            else:
                _write_png(depth_png_array(pred), target / f"{p.stem}.png")
    bar.close()
    if paths and len(skipped) == len(paths):
        raise ValueError(f"none of the {len(paths)} input image(s) could be read (e.g. {skipped[0]}); nothing was "
                         "predicted")
    if kind in ("det", "cls"):
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(json.dumps(results))
        tmp.replace(target)
    return {"task": task, "type": kind, "images": len(paths) - len(skipped), "skipped": skipped,
            "written": str(target), "detections": len(results) if kind == "det" else None}
