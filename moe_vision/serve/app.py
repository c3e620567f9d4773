"""The web app: a static page (``static/``) over a small JSON API.

- ``GET /``: the page; ``GET /static/...``: its script and style.
- ``GET /info``: tasks (type, class names), MoE layers with their experts (a bundle's kept ones),
  the experts each task may choose (``allowed``), the run's average expert usage per layer and
  task, example images.
- ``GET /examples/{id}``: one of the run's validation images (by number; nothing else on disk is
  reachable).
- ``POST /predict`` (multipart: ``file`` an image, or ``example`` an id; optional ``task``, else
  every task): per task the answer in ``tools/predict.py``'s formats (cls top-5; det COCO results
  with XYWH boxes in the image's pixels; seg the label map as an 8-bit PNG; depth a 16-bit PNG in
  millimetres, plus a coloured preview) and the routing maps of every MoE layer.

The model is loaded once; requests run one at a time, and at most ``max_queue`` wait (more get
503). A bad request gets a JSON ``{"error": ...}`` with a 4xx status and the server stays up.
FastAPI was chosen over Gradio for a page of our own (canvas drawings of boxes, label maps and
per-patch routing) on a typed JSON API with generated docs (``/docs``), at a small dependency.
"""
from __future__ import annotations

import base64
import io
import threading
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image

from ..data.readers import DEFAULT_MAX_PIXELS, ImageTooLarge, decode_image
from ..inference.predict import cls_top5, depth_png_array, det_records, predict_batch, seg_png_array
from .routing import routing_maps
from .source import ServedModel, load_source

STATIC = Path(__file__).resolve().parent / "static"


def png_base64(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def depth_preview(depth_m: np.ndarray) -> np.ndarray:
    """A depth map as an RGB picture (near bright, far dark; matplotlib's magma)."""
    from matplotlib import colormaps
    lo, hi = float(depth_m.min()), float(depth_m.max())
    scaled = 1 - (depth_m - lo) / max(hi - lo, 1e-6)
    return (colormaps["magma"](scaled)[..., :3] * 255).astype(np.uint8)


class Predictor:
    """Runs one image through the served model, one request at a time."""

    def __init__(self, served: ServedModel, max_queue: int = 4) -> None:
        self.served, self.max_queue = served, max_queue
        self.lock, self.waiting = threading.Lock(), 0
        self.counter_lock = threading.Lock()

    def __call__(self, image: torch.Tensor, name: str, tasks: list[str]) -> dict:
        with self.counter_lock:
            if self.waiting >= self.max_queue:
                raise BusyError(f"{self.waiting} requests are waiting; try again in a moment")
            self.waiting += 1
        try:
            with self.lock:
                return {"image": name, "size": list(image.shape[-2:]),
                        "tasks": {t: self.one_task(image, name, t) for t in tasks}}
        finally:
            with self.counter_lock:
                self.waiting -= 1

    def one_task(self, image: torch.Tensor, name: str, task: str) -> dict:
        model, served = self.served.model, self.served
        spec = model.spec(task)
        (pred,), routing, canvas = predict_batch(model, task, [image], return_routing=True)
        p = model.backbone.patch_size
        grid = (-(-canvas[0] // p), -(-canvas[1] // p))
        kind = spec.type_name
        out: dict = {"type": kind}
        if kind == "cls":
            out["top5"] = cls_top5(pred, served.class_names(task))
        elif kind == "det":
            out["detections"] = det_records(pred, name)
        elif kind == "seg":
            labels = seg_png_array(pred)
            out["label_map_png"] = png_base64(labels)
            out["classes_present"] = sorted(int(c) for c in np.unique(labels))
        elif kind == "depth":
            out["depth_png"] = png_base64(depth_png_array(pred))
            depth = pred.numpy()
            out["depth_m"] = {"min": float(depth.min()), "max": float(depth.max()), "mean": float(depth.mean())}
            out["preview_png"] = png_base64(depth_preview(depth))
        else:
            raise ValueError(f"task {task!r} of type {kind!r} has no answer to show")
        out["routing"] = routing_maps(routing, grid, model.backbone.num_prefix_tokens, served.kept_experts)
        out["input_size"] = list(canvas)
        return out


class BusyError(RuntimeError):
    pass


def create_app(source: ServedModel | str | Path, max_upload_mb: float = 10.0, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_queue: int = 4, device: str = "cpu"):
    """The FastAPI app for a run directory, a bundle folder or a loaded :class:`ServedModel`."""
    served = source if isinstance(source, ServedModel) else load_source(source, device)
    predictor = Predictor(served, max_queue)
    limit = int(max_upload_mb * 1e6)
    app = FastAPI(title="moe-vision", summary=f"{served.kind} {served.path.name}: tasks {', '.join(served.tasks)}",
                  description="Predictions and expert routing maps of a moe-vision model (docs/serve.md).")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    @app.exception_handler(ValueError)
    async def value_error(request: Request, exc: ValueError):
        return JSONResponse({"error": str(exc)}, status_code=413 if isinstance(exc, ImageTooLarge) else 400)

    @app.exception_handler(BusyError)
    async def busy(request: Request, exc: BusyError):
        return JSONResponse({"error": f"busy: {exc}"}, status_code=503)

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/info")
    def info() -> dict:
        return {**served.info(), "limits": {"max_upload_mb": max_upload_mb, "max_pixels": max_pixels}}

    @app.get("/examples/{example_id}")
    def example(example_id: int):
        if not 0 <= example_id < len(served.examples):
            raise HTTPException(404, f"no example {example_id}; there are {len(served.examples)}")
        return FileResponse(served.examples[example_id][1])

    @app.post("/predict")
    def predict(file: UploadFile | None = File(None), example: int | None = Form(None), task: str | None = Form(None)):
        if task is not None and task not in served.tasks:
            raise HTTPException(400, f"unknown task {task!r}; this model has tasks {served.tasks}")
        if file is not None:
            data = file.file.read(limit + 1)
            if len(data) > limit:
                raise HTTPException(413, f"{file.filename} is larger than the upload limit of {max_upload_mb:g} MB "
                                         "(tools/serve.py --max-upload-mb)")
            name = Path(file.filename or "upload").name
        elif example is not None:
            if not 0 <= example < len(served.examples):
                raise HTTPException(404, f"no example {example}; there are {len(served.examples)}")
            path = served.examples[example][1]
            data, name = path.read_bytes(), path.name
        else:
            raise HTTPException(400, "send an image as 'file' (multipart) or an example id as 'example'")
        image = decode_image(data, name, max_pixels)
        return predictor(image, name, [task] if task else served.tasks)

    return app
