"""tools/serve.py's app: the JSON API answers as tools/predict.py does, routing maps have the patch
grid's shape and name only the model's (kept) experts, bad requests get one clear error and the
server stays up, and nothing outside the run is readable."""
import base64
import io
import json
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

fastapi = pytest.importorskip("fastapi", reason="the serve extra: pip install -e '.[serve]'")
from fastapi.testclient import TestClient  # noqa: E402

from moe_vision.serve import create_app, load_source  # noqa: E402
from moe_vision.inference.predict import image_files, predict_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
from tests.conftest import SERVE_TASKS as TASKS  # noqa: E402
from tests.tool_run import run_tool  # noqa: E402


@pytest.fixture(scope="module")
def client(four_task_run):
    return TestClient(create_app(four_task_run))


def _png(b64):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def _image_bytes(path):
    return Path(path).read_bytes()


def test_info_lists_tasks_classes_layers_usage_and_examples(client):
    info = client.get("/info").json()
    assert set(info["tasks"]) == set(TASKS) and info["kind"] == "run"
    assert len(info["tasks"]["seg"]["classes"]) == 14
    assert set(info["layers"]) == {"blocks.1.mlp", "blocks.3.mlp"}
    assert info["layers"]["blocks.1.mlp"]["experts"] == [0, 1, 2, 3]
    assert info["allowed"]["blocks.1.mlp"]["det"] == [0, 1, 2, 3]  # no budget: every expert
    assert abs(sum(info["usage"]["blocks.1.mlp"]["det"]) - 1) < 1e-6
    assert {e["task"] for e in info["examples"]} == set(TASKS)
    first = info["examples"][0]
    assert client.get(f"/examples/{first['id']}").status_code == 200


def test_predictions_equal_tools_predict_and_routing_maps_cover_the_patch_grid(client, four_task_run, synthetic_root,
                                                                              tmp_path):
    model = load_source(four_task_run).model
    inputs = {"cls": next((synthetic_root / "cls/val").rglob("*.png")), "det": synthetic_root / "det/val/00000.png",
              "seg": next((synthetic_root / "seg/images/validation").glob("*")),
              "depth": next((synthetic_root / "depth/val/rgb").glob("*.png"))}
    for task, image in inputs.items():
        r = client.post("/predict", files={"file": (image.name, _image_bytes(image), "image/png")}, data={"task": task})
        assert r.status_code == 200, r.text
        out = r.json()["tasks"][task]
        want_dir = tmp_path / task
        predict_folder(model, task, image_files([image]), want_dir, progress=False)
        if task == "det":
            assert out["detections"] == json.loads((want_dir / "det_results.json").read_text())
        elif task == "cls":
            assert out["top5"] == json.loads((want_dir / "cls_predictions.json").read_text())[0]["top5"]
        elif task == "seg":
            assert np.array_equal(_png(out["label_map_png"]),
                                  np.asarray(Image.open(want_dir / "annotations" / f"{image.stem}.png")))
        else:
            assert np.array_equal(_png(out["depth_png"]), np.asarray(Image.open(want_dir / "depth" / f"{image.stem}.png")))
        h, w = out["input_size"]
        assert len(out["routing"]) == 2
        for m in out["routing"]:
            assert m["grid"] == [-(-h // 8), -(-w // 8)]
            top1 = np.array(m["top1"])
            assert top1.shape == tuple(m["grid"]) and set(top1.ravel()) <= {0, 1, 2, 3}
            assert np.array(m["topk"]).shape == (*m["grid"], 2) and abs(sum(m["usage"].values()) - 1) < 1e-3


def test_all_tasks_at_once_and_examples_by_id(client):
    r = client.post("/predict", data={"example": "0"})
    assert r.status_code == 200 and set(r.json()["tasks"]) == set(TASKS)


def test_a_bundle_maps_routing_to_its_kept_experts(tiny_run, synthetic_root):
    bundle = tiny_run / "experts" / "det"
    kept = json.loads((bundle / "bundle.json").read_text())["kept_experts"]
    c = TestClient(create_app(bundle))
    info = c.get("/info").json()
    assert info["kind"] == "bundle" and list(info["tasks"]) == ["det"] and info["kept_experts"] == kept
    assert info["allowed"] == {layer: {"det": experts} for layer, experts in kept.items()}  # in the parent's ids
    image = synthetic_root / "det/val/00001.png"
    out = c.post("/predict", files={"file": ("x.png", _image_bytes(image), "image/png")}).json()["tasks"]["det"]
    for m in out["routing"]:
        used = set(np.array(m["topk"]).ravel().tolist())
        assert used <= set(kept[m["layer"]]), (m["layer"], used, kept[m["layer"]])


def test_bad_requests_get_one_clear_error_and_the_server_stays_up(four_task_run, synthetic_root):
    c = TestClient(create_app(four_task_run, max_upload_mb=0.01, max_pixels=2000))
    png = _image_bytes(synthetic_root / "det/val/00000.png")  # 32x32: within both limits
    r = c.post("/predict", files={"file": ("notes.txt", b"this is not an image", "text/plain")})
    assert r.status_code == 400 and "notes.txt is not an image" in r.json()["error"]
    r = c.post("/predict", files={"file": ("big.png", b"\x89PNG" + b"0" * 20_000, "image/png")})
    assert r.status_code == 413 and "upload limit of 0.01 MB" in r.json()["error"]
    big = io.BytesIO()
    Image.new("RGB", (100, 100)).save(big, format="PNG")
    r = c.post("/predict", files={"file": ("wide.png", big.getvalue(), "image/png")})
    assert r.status_code == 413 and "100x100 pixels; the limit is 0.002 megapixels" in r.json()["error"]
    r = c.post("/predict", files={"file": ("a.png", png, "image/png")}, data={"task": "pose"})
    assert r.status_code == 400 and "unknown task 'pose'" in r.json()["error"]
    assert c.post("/predict").status_code == 400
    assert c.post("/predict", data={"example": "999"}).status_code == 404
    assert c.post("/predict", files={"file": ("a.png", png, "image/png")}, data={"task": "det"}).status_code == 200


def test_nothing_outside_the_served_files_is_readable(client, four_task_run):
    secret = (four_task_run / "model.safetensors").read_bytes()[:64]
    for url in ["/static/../model.safetensors", "/static/..%2f..%2fconfig.json", "/static/%2e%2e/%2e%2e/etc/passwd",
                "/examples/..%2f..%2fconfig.json", "/examples/-1", "/../../etc/passwd", "/static//etc/passwd",
                f"/static/{four_task_run}/model.safetensors"]:
        r = client.get(url)
        assert r.status_code in (400, 404, 422), (url, r.status_code)
        assert secret not in r.content and b"root:" not in r.content


def test_incomplete_bundle_and_wrong_folder_are_refused(tiny_run, tmp_path):
    import shutil
    broken = tmp_path / "det"
    shutil.copytree(tiny_run / "experts" / "det", broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"bundle .* is incomplete: model.safetensors is missing"):
        load_source(broken)
    with pytest.raises(ValueError, match=r"neither a run directory .* nor a bundle"):
        load_source(tmp_path)


def test_the_tool_refuses_a_port_in_use_with_one_line(four_task_run):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_tool("serve.py", four_task_run, "--port", port)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: cannot listen on 127.0.0.1:") \
        and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.slow
def test_the_server_holds_under_a_bounded_load(four_task_run):
    from moe_vision.bench.serve_load import load_test
    r = load_test(four_task_run, clients=8, requests=200)
    assert r["unanswered"] == 0 and r["alive_after"]
    for kind, counts in r["statuses"].items():
        allowed = {200, 503} if kind == "image" else {400, 413, 503}
        assert set(counts) <= allowed, (kind, counts)
    assert r["statuses"]["image"].get(200, 0) > 0 and r["statuses"]["too_large_upload"].get(413, 0) > 0
    assert r["rss_mb"]["growth"] < 200
