"""Command-line tools: they run, write what they promise and fail with one clear line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_vision.models import build_model, count_parameters

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_benchmark_writes_ratios_json(tmp_path):
    out = tmp_path / "bench.json"
    r = _run("tools/benchmark.py", "--cases", "a", "b", "--tokens", "64", "--warmup", "0", "--repeats", "1",
             "--json", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert set(data["configs"]) == {"a", "b"}
    for cfg in data["configs"].values():
        assert cfg["ratio_vs_dense"] > 0
        assert set(cfg["times_ms"]) >= {"ours", "dense", "naive"}
        assert "speedup_vs_fairscale" in cfg
    assert data["configs"]["a"]["speedup_vs_fairscale"] is not None  # fairscale is in the dev extra
    assert "vs dense" in r.stdout


def test_inspect_model_runs_and_rejects_bad_name():
    r = _run("tools/inspect_model.py", "model.moe.num_experts=4", "batch_size=1")
    assert r.returncode == 0, r.stderr
    assert "MoE layers" in r.stdout and "blocks.3.mlp" in r.stdout
    bad = _run("tools/inspect_model.py", "model.name=vit_nope")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]  # one line
    assert "model.name='vit_nope'" in bad.stderr and "moe_vit_nano_patch8" in bad.stderr


def test_build_model_and_active_parameter_count():
    cfg = {"name": "moe_vit_nano_patch8", "moe": {"num_experts": 4, "top_k": 1}}
    model = build_model(cfg, ["cls", "det"])
    counts = count_parameters(model)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    gate = model.blocks[1].mlp.router.gates["cls"].weight.numel()
    # 3 of 4 experts idle per token; one task's router, embedding idle per layer / model.
    expected_inactive = experts * 3 // 4 + 2 * gate + model.task_embed["det"].numel()
    assert counts["total"] - counts["active"] == expected_inactive
    with pytest.raises(FileNotFoundError, match="dense checkpoint .*vit.pth does not exist"):
        build_model({**cfg, "upcycle_from": "/nonexistent/vit.pth"}, ["cls"])


def test_build_model_from_checkpoint_checks_tasks(tmp_path):
    from moe_vision.models import save_model
    model = build_model({"name": "moe_vit_nano_patch8"}, ["cls"])
    path = save_model(model, tmp_path / "m.safetensors")
    again = build_model({"name": "ignored", "checkpoint": str(path)}, ["cls"])
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(again.eval().forward_features(x, "cls"), model.eval().forward_features(x, "cls"))
    with pytest.raises(ValueError, match=r"has no task\(s\) \['det'\]"):
        build_model({"checkpoint": str(path)}, ["cls", "det"])
