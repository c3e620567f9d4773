"""Tree crowns in aerial RGB images (the annotated examples DeepForest ships: Pascal VOC XML boxes)
cut into square tiles in the COCO layout (``train/``, ``val/``, ``annotations/instances_<split>.json``).
Whole images are assigned to a split, so no test tile overlaps a training tile."""
from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Mapping

from PIL import Image

CATEGORY = {"id": 1, "name": "tree"}  # every crown, alive or dead (SOAP_061 labels them Dead/Alive)
MIN_INSIDE = 0.5  # a box cut by a tile's edge is kept in that tile when at least half its area is inside


def read_voc(name: str, raw: bytes) -> tuple[tuple[int, int], list[tuple[float, float, float, float]]]:
    """``((width, height), [(x0, y0, x1, y1), ...])`` of a Pascal VOC annotation file."""
    try:
        root = ET.fromstring(raw)
        size = (int(root.findtext("size/width")), int(root.findtext("size/height")))
        boxes = []
        for obj in root.iter("object"):
            b = obj.find("bndbox")
            x0, y0, x1, y1 = (float(b.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            if x1 <= x0 or y1 <= y0:
                raise ValueError(f"box {x0, y0, x1, y1} is empty")
            boxes.append((x0, y0, x1, y1))
    except (ET.ParseError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"{name}: not a readable Pascal VOC annotation ({e})") from None
    return size, boxes


def tile_starts(length: int, tile: int) -> list[int]:
    """Tile origins along one side: every ``tile`` pixels, the last one moved back to end at the edge."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, tile))
    return starts + ([length - tile] if starts[-1] + tile < length else [])


def tile_boxes(boxes, x: int, y: int, tile: int) -> list[list[float]]:
    """COCO ``[x, y, w, h]`` boxes of one tile: clipped to it, kept when half or more is inside."""
    out = []
    for x0, y0, x1, y1 in boxes:
        cx0, cy0, cx1, cy1 = max(x0, x), max(y0, y), min(x1, x + tile), min(y1, y + tile)
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        if (cx1 - cx0) * (cy1 - cy0) >= MIN_INSIDE * (x1 - x0) * (y1 - y0):
            out.append([cx0 - x, cy0 - y, cx1 - cx0, cy1 - cy0])
    return out


def write_coco_tiles(images: Mapping[str, tuple[bytes, bytes]], splits: Mapping[str, list[str]], out: Path,
                     tile: int = 128) -> dict[str, dict[str, int]]:
    """Tile ``images`` (stem -> (image bytes, VOC XML bytes)) into ``out`` by ``splits`` (split ->
    stems); returns tiles and boxes per split."""
    counts = {}
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for split, stems in splits.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        coco = {"images": [], "annotations": [], "categories": [CATEGORY]}
        for stem in stems:
            if stem not in images:
                raise FileNotFoundError(f"{stem}.png or {stem}.xml is missing from the tree images")
            png, xml = images[stem]
            (w, h), boxes = read_voc(f"{stem}.xml", xml)
            try:
                image = Image.open(io.BytesIO(png)).convert("RGB")
            except OSError as e:
                raise ValueError(f"{stem}.png: unreadable image ({e})") from None
            if image.size != (w, h):
                raise ValueError(f"{stem}.xml says {w}x{h} but {stem}.png is {image.size[0]}x{image.size[1]}")
            for y in tile_starts(h, tile):
                for x in tile_starts(w, tile):
                    image_id = len(coco["images"]) + 1
                    name = f"{stem}_x{x}_y{y}.png"
                    crop = image.crop((x, y, x + min(tile, w), y + min(tile, h)))
                    crop.save(out / split / name)
                    coco["images"].append({"id": image_id, "file_name": name, "width": crop.size[0],
                                           "height": crop.size[1]})
                    for bbox in tile_boxes(boxes, x, y, tile):
                        coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image_id,
                                                    "category_id": CATEGORY["id"], "bbox": bbox,
                                                    "area": bbox[2] * bbox[3], "iscrowd": 0})
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
        counts[split] = {"tiles": len(coco["images"]), "boxes": len(coco["annotations"])}
    return counts
