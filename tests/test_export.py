"""Export: the static-shaped MoE path equals the sparse one, ONNX / torch.export parity with
PyTorch for every task type (dynamic batch), folder prediction into standard result files, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_vision.export import dense_experts, export_model, task_graph
from moe_vision.export.runtime import load_runner
from moe_vision.moe import MoEMLP
from tests.tool_run import run_tool

ROOT = Path(__file__).resolve().parents[1]


def _has_onnx() -> bool:
    try:
        import onnx, onnxruntime, onnxscript  # noqa: F401
        return True
    except ImportError:
        return False


needs_onnx = pytest.mark.skipif(not _has_onnx(), reason="the export extra (onnx, onnxruntime, onnxscript) is missing")


@pytest.mark.parametrize("E,K,added", [(4, 1, ()), (8, 2, ()), (6, 3, ()), (4, 2, (2,))])
def test_dense_over_kept_experts_equals_the_sparse_path_in_fp64(E, K, added):
    torch.manual_seed(E + K)
    layer = MoEMLP(16, 8, ["a", "b"], num_experts=E, top_k=K, added_experts=added,
                   task_added_groups={"b": len(added)} if added else None).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    x = torch.randn(3, 7, 16, dtype=torch.double)
    for task in ("a", "b"):
        sparse, routing = layer(x, task)
        with dense_experts(layer):
            dense, none = layer(x, task)
        assert none is None and routing is not None and layer.dense_experts is False
        assert torch.allclose(dense, sparse, rtol=0, atol=1e-12)


@needs_onnx
@pytest.mark.parametrize("task", ["det", pytest.param("seg", marks=pytest.mark.slow)])  # (seg: 10 s, to test-slow)
def test_bundle_exports_to_onnx_with_parity_and_a_dynamic_batch(tiny_run, task):
    out = tiny_run / f"{task}.onnx"
    report = export_model(out, "onnx", bundle=tiny_run / "experts" / task, postprocess=True, log=lambda m: None)
    assert report["passed"] and report["max_abs_diff"] <= 1e-4 and out.is_file()
    assert report["parity_images"]["calibration"] == 6  # the tiny benchmark's val split: real images
    assert report["metrics"]["max_abs_diff"] <= 1e-4
    assert report["metrics"]["identical"] == (report["metrics"]["pytorch"] == report["metrics"]["exported"])
    assert json.loads(out.with_name(out.name + ".json").read_text())["passed"] is True
    import onnxruntime as ort
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "images" and session.get_outputs()[0].name in ("logits", "mask_logits")
    from moe_vision.surgery.bundle import load_bundle
    graph = task_graph(load_bundle(tiny_run / "experts" / task), task, postprocess=True)
    run = load_runner(out, "onnx")
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            got, want = run(x), graph(x)
        assert len(got) == len(want) and all(g.shape == w.shape for g, w in zip(got, want))
        assert all(float((g.double() - w.double()).abs().max()) <= 1e-4 for g, w in zip(got, want)
                   if w.is_floating_point())


@needs_onnx
@pytest.mark.parametrize("kind", [pytest.param("cls", marks=pytest.mark.slow), pytest.param("depth", marks=pytest.mark.slow)])
def test_full_model_tasks_export_to_onnx(tmp_path, kind):
    from moe_vision.engine.builders import build_generalist
    from moe_vision.models import save_model
    task_cfg = {"type": kind, "num_classes": 5} if kind == "cls" else {"type": "depth"}
    model = build_generalist({"model": {"name": "moe_vit_nano_patch8", "img_size": 32, "moe": {"num_experts": 4}},
                              "tasks": {kind: task_cfg, "other": {"type": "cls", "num_classes": 3}},
                              "decoder": {"dim": 32, "num_queries": 4, "num_layers": 1, "num_heads": 2}})
    ckpt = save_model(model, tmp_path / "m.safetensors")
    report = export_model(tmp_path / f"{kind}.onnx", "onnx", checkpoint=ckpt, task=kind, postprocess=True,
                          log=lambda m: None)
    assert report["passed"] and report["metrics"] is None  # no run config: random images only
    assert report["outputs"][0] == ("logits" if kind == "cls" else "log_depth")
    assert report["moe_cost"]["expert_flops_ratio"] == 2.0  # 4 experts, top-2
    with pytest.raises(ValueError, match="--task is required"):
        export_model(tmp_path / "x.onnx", "onnx", checkpoint=ckpt, log=lambda m: None)


def test_torch_export_keeps_parity_and_refuses_existing_output(tiny_run):
    out = tiny_run / "seg.pt2"
    report = export_model(out, "torch_export", bundle=tiny_run / "experts" / "seg", log=lambda m: None)
    assert report["passed"] and report["max_abs_diff"] <= 1e-4 and report["metrics"]["max_abs_diff"] <= 1e-4
    before = out.stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="pass --force"):
        export_model(out, "torch_export", bundle=tiny_run / "experts" / "seg", log=lambda m: None)
    assert out.stat().st_mtime_ns == before


def test_export_tool_adds_the_latency_rows_to_its_report(tiny_run, tmp_path):
    out = tmp_path / "seg.pt2"
    r = run_tool("export.py", "--bundle", tiny_run / "experts" / "seg", "--format", "torch_export", "--out", out,
                 "--calib-images", "0", "--latency")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.with_name("seg.pt2.json").read_text())["latency"]
    assert {(r["model"].split(",")[1].strip(), r["batch"]) for r in rows} >= {("bundle", 1), ("bundle", 8)}
    assert all(r["ms"] > 0 and r["ms_per_image"] == pytest.approx(r["ms"] / r["batch"]) for r in rows)


def test_export_bad_input(tiny_run, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="--format 'tflite'; expected one of onnx, torch_export"):
        export_model(tmp_path / "a", "tflite", bundle=tiny_run / "experts" / "det", log=lambda m: None)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bundle.json").write_text("{}")
    with pytest.raises(ValueError, match="incomplete: model.safetensors is missing"):
        export_model(tmp_path / "b.pt2", "torch_export", bundle=broken, log=lambda m: None)
    import builtins
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "onnxruntime" else real_import(name, *a, **k))
    from moe_vision.errors import MissingExtra
    with pytest.raises(MissingExtra, match=r"pip install -e '\.\[export\]'"):
        export_model(tmp_path / "c.onnx", "onnx", bundle=tiny_run / "experts" / "det", log=lambda m: None)
    assert not (tmp_path / "c.onnx").exists()


def test_folder_prediction_writes_coco_results_and_label_maps(tiny_run, synthetic_root, tmp_path):
    from pycocotools.coco import COCO
    images = tmp_path / "images"
    images.mkdir()
    for p in sorted((synthetic_root / "det" / "val").glob("*.png")):
        (images / p.name).write_bytes(p.read_bytes())
    (images / "zz_broken.png").write_bytes(b"not a png")
    ann = synthetic_root / "det" / "annotations" / "instances_val.json"
    run = lambda *args: run_tool("predict.py", *args)
    r = run("--bundle", tiny_run / "experts" / "det", images, "--out", tmp_path / "pred", "--coco-ann", ann,
            "--batch-size", "4")
    assert r.returncode == 2 and "has no image entry" in r.stderr and "zz_broken.png" in r.stderr
    (images / "zz_broken.png").unlink()
    r = run("--bundle", tiny_run / "experts" / "det", images, "--out", tmp_path / "pred", "--coco-ann", ann,
            "--batch-size", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    gt = COCO(str(ann))
    dt = gt.loadRes(str(tmp_path / "pred" / "det_results.json"))
    assert set(dt.getImgIds()) <= set(gt.getImgIds()) and len(dt.anns) == 6 * 100
    assert {a["category_id"] for a in dt.anns.values()} <= set(gt.getCatIds())
    again = run("--bundle", tiny_run / "experts" / "det", images, "--out", tmp_path / "pred", "--coco-ann", ann)
    assert again.returncode == 2 and "pass --force" in again.stderr
    # Segmentation: ADE20K-layout PNG label maps at each image's own size; a corrupt file is skipped, named.
    from moe_vision.surgery.bundle import load_bundle
    from moe_vision.inference.predict import image_files, predict_folder
    seg_images = synthetic_root / "seg" / "images" / "validation"
    paths = image_files([seg_images]) + [tmp_path / "broken.jpg"]
    (tmp_path / "broken.jpg").write_bytes(b"garbage")
    said = []
    summary = predict_folder(load_bundle(tiny_run / "experts" / "seg"), "seg", paths, tmp_path / "segp",
                             batch_size=4, label_offset=1, progress=False, log=said.append)
    assert summary["skipped"] == [str(tmp_path / "broken.jpg")]
    assert len(said) == 1 and said[0].startswith(f"skipped: image {tmp_path / 'broken.jpg'} is corrupt")
    import numpy as np
    from PIL import Image
    maps = sorted((tmp_path / "segp" / "annotations").glob("*.png"))
    assert len(maps) == 6
    arr = np.asarray(Image.open(maps[0]))
    assert arr.dtype == np.uint8 and arr.shape == (32, 32) and arr.min() >= 1


def test_folder_prediction_writes_16_bit_depth_pngs_in_millimetres(synthetic_root, tmp_path):
    import numpy as np
    from PIL import Image
    from moe_vision.engine.builders import build_generalist
    from moe_vision.inference.predict import image_files, predict_folder
    model = build_generalist({"model": {"name": "moe_vit_nano_patch8", "img_size": 32, "moe": {"num_experts": 4}},
                              "tasks": {"depth": {"type": "depth"}},
                              "decoder": {"dim": 32, "num_queries": 4, "num_layers": 1, "num_heads": 2}})
    paths = image_files([synthetic_root / "depth" / "val" / "rgb"])[:3]
    summary = predict_folder(model, "depth", paths, tmp_path, batch_size=2, progress=False)
    assert summary["images"] == 3 and not summary["skipped"]
    png = np.asarray(Image.open(tmp_path / "depth" / f"{paths[0].stem}.png"))
    assert png.dtype == np.uint16 and png.shape == (32, 32) and png.min() >= 1
    with torch.no_grad():
        from moe_vision.data import build_transforms, read_image
        x = build_transforms("cls", False, 32)(read_image(paths[0]))[None]
        want_mm = model.eval()(x, "depth")["log_depth"].exp()[0] * 1000
    assert np.abs(png.astype(np.float64) - want_mm.double().numpy()).max() <= 0.5 + 1e-6  # rounded to 1 mm
