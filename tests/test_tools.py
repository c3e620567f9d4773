"""Command-line tools: they run, write what they promise and fail with one clear line."""
import json
from pathlib import Path

import pytest
import torch

from moe_vision.models import build_model, count_parameters
from tests.tool_run import run_child, run_tool as _run

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_writes_ratios_json(tmp_path):
    out = tmp_path / "bench.json"
    r = _run("tools/benchmark.py", "--cases", "a", "b", "--tokens", "64", "--warmup", "0", "--repeats", "1",
             "--json", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert set(data["configs"]) == {"a-eager", "b-eager"}
    for cfg in data["configs"].values():
        assert cfg["ratio_vs_dense"] > 0 and not cfg["compiled"]
        assert set(cfg["times_ms"]) >= {"ours", "dense", "naive"}
        assert 0 < cfg["expert_gemm_share"] < 1  # the profiler found the grouped expert operators
        assert "speedup_vs_fairscale" in cfg
    assert data["configs"]["a-eager"]["speedup_vs_fairscale"] is not None  # fairscale is in the dev extra
    assert "vs dense" in r.stdout and "fairscale/ours" in r.stdout and ">=3" not in r.stdout


def test_inspect_model_runs_and_rejects_bad_name():
    r = _run("tools/inspect_model.py", "model.moe.num_experts=4", "batch_size=1")
    assert r.returncode == 0, r.stderr
    assert "MoE layers" in r.stdout and "blocks.3.mlp" in r.stdout
    bad = run_child("tools/inspect_model.py", "model.name=vit_nope")  # a real process: nothing else on stderr
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
    assert torch.equal(again.eval().forward_tokens(x, "cls"), model.eval().forward_tokens(x, "cls"))
    with pytest.raises(ValueError, match=r"has no task\(s\) \['det'\]"):
        build_model({"checkpoint": str(path)}, ["cls", "det"])


def test_make_synthetic_train_evaluate_compare_cli(tmp_path):
    data = tmp_path / "syn"
    r = _run("tools/make_synthetic.py", "--out", str(data), "--scale", "0.01", "--img-size", "32")
    assert r.returncode == 0, r.stderr
    assert (data / "synthetic.json").is_file()
    again = _run("tools/make_synthetic.py", "--out", str(data), "--scale", "0.01")
    assert "already holds a complete benchmark" in again.stdout
    unl = tmp_path / "unl"
    r = _run("tools/make_synthetic.py", "--unlabelled", "20", "--scale", "0.1", "--img-size", "32", "--out", str(unl))
    assert r.returncode == 0, r.stderr
    assert len(list((unl / "unlabelled/train").glob("*.png"))) == 2 and not (unl / "cls").exists()
    common = [f"data.root={data}", "data.synthetic=null", "data.img_size=32", "model=moe_vit_nano", "model.img_size=32",
              "model.moe.num_experts=4", "decoder.dim=32", "decoder.num_queries=14", "decoder.num_layers=1",
              "decoder.num_heads=2", "tasks.cls.batch_size=4", "tasks.det.batch_size=4", "tasks.seg.batch_size=2",
              "device=cpu", "eval.batch_size=8"]
    run = tmp_path / "run"
    r = _run("tools/train.py", "experiment=synthetic", "train.steps=2", "train.warmup_steps=1",
             f"output_dir={run}", *common)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "chance" in r.stdout and "blocks.1.mlp" in r.stdout
    r = _run("tools/evaluate.py", "experiment=synthetic", f"eval.checkpoint={run}", f"eval.out={tmp_path / 'ev'}",
             *common)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text()).keys() == {"cls", "det", "seg"}
    r = _run("tools/evaluate.py", "experiment=synthetic", f"eval.checkpoint={run}", f"eval.out={tmp_path / 'nms'}",
             "+eval.task_options.det.inference=queries_nms", *common)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "mAP50" in json.loads((tmp_path / "nms" / "metrics.json").read_text())["det"]
    bad = _run("tools/evaluate.py", "experiment=synthetic", f"eval.checkpoint={run}", f"eval.out={tmp_path / 'x'}",
               "+eval.task_options.det.inferense=queries_nms", *common)
    assert bad.returncode == 2 and "has no option 'inferense'" in bad.stderr
    single = tmp_path / "single"
    r = _run("tools/train.py", "experiment=synthetic_single_task", "single_task=seg", "train.steps=1",
             "train.warmup_steps=1", f"output_dir={single}", *common)
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run("tools/compare.py", str(run), str(single))
    assert r.returncode == 0 and "seg" in r.stdout and "mIoU" in r.stdout
    bad = _run("tools/compare.py", str(run), str(tmp_path / "nope"))
    assert bad.returncode == 2 and "has no metrics.json" in bad.stderr
    bad = _run("tools/train.py", "experiment=synthetic", f"output_dir={run}", *common)
    assert bad.returncode == 2 and "pass resume=true" in bad.stderr


def test_surgery_cli_extract_predict_add_task_finetune(synthetic_root, tmp_path):
    from moe_vision.engine.trainer import Trainer
    from tests.test_engine import make_cfg
    run = tmp_path / "run"
    Trainer(make_cfg(synthetic_root, run, "train.steps=2")).fit()
    bundle = tmp_path / "experts" / "det"
    r = _run("tools/extract_experts.py", "--task", "det", "--checkpoint", str(run), "--out", str(bundle),
             "--latency-calls", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "bit-identical" in r.stdout and "parameters" in r.stdout and "kept" in r.stdout
    again = _run("tools/extract_experts.py", "--task", "det", "--checkpoint", str(run), "--out", str(bundle))
    assert again.returncode == 2 and "pass --force" in again.stderr
    bad = _run("tools/extract_experts.py", "--task", "pose", "--checkpoint", str(run), "--out", str(tmp_path / "p"))
    assert bad.returncode == 2 and "unknown task 'pose'" in bad.stderr and "'det'" in bad.stderr
    img = next((synthetic_root / "det" / "val").glob("*.png"))
    r = _run("tools/predict.py", "--bundle", str(bundle), "--parent", str(run), str(img), "--out", str(tmp_path / "pr"),
             "--score-threshold", "0", "--pictures")
    assert r.returncode == 0, r.stderr[-2000:]
    pred = json.loads((tmp_path / "pr" / f"{img.stem}.det.json").read_text())
    assert "detections" in pred and (tmp_path / "pr" / f"{img.stem}.det.png").is_file()
    from moe_vision.data.synthetic import CLASS_NAMES
    assert pred["detections"] and all(d["label"] in CLASS_NAMES for d in pred["detections"])  # names recorded at training
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    r = _run("tools/predict.py", "--bundle", str(bundle), str(corrupt), "--out", str(tmp_path / "none"))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(f"error: image {corrupt} is corrupt")
    r = _run("tools/predict.py", "--bundle", str(bundle), str(corrupt), str(img), "--out", str(tmp_path / "some"))
    assert r.returncode == 0 and "skipped 1 unreadable" in r.stdout  # a folder with some corrupt files
    assert r.stderr.count("\r") <= 3  # the progress bar, in a log, is not redrawn per image
    run2 = tmp_path / "run2"
    r = _run("tools/add_task.py", "--checkpoint", str(run), "--task", "depth", "--data", str(synthetic_root / "depth"),
             "--new-experts", "1", "--out", str(run2))
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((run2 / "continual_report.json").read_text())
    parent_cfg = json.loads((run / "config.json").read_text())
    assert rep["train_steps"] == parent_cfg["train"]["steps"] == 2  # the parent's schedule by default
    added_cfg = json.loads((run2 / "config.json").read_text())["tasks"]["depth"]
    assert added_cfg["batch_size"] == min(t["batch_size"] for t in parent_cfg["tasks"].values())
    assert rep["old_tasks_bit_identical"] is True and rep["bit_identical_conditions"]["torch"] == torch.__version__
    assert all(v == 0 for ms in rep["old_metrics_delta"].values() for v in ms.values())
    assert rep["parameters"]["trainable"] < rep["parameters"]["total"]
    r = _run("tools/finetune.py", "--bundle", str(bundle), "--data", str(synthetic_root / "det"), "--steps", "2",
             "--batch-size", "4", "--out", str(tmp_path / "ft"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout[r.stdout.index("{"):])["trainable"] == "head"


def _fake_run(path: Path, metrics: dict, chance: dict | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps(metrics))
    if chance is not None:
        (path / "chance_metrics.json").write_text(json.dumps(chance))
    return path


def test_summarize_runs_means_and_half_ranges_over_seeds(tmp_path):
    from moe_vision.engine.report import parse_run_groups, seed_summary

    for seed, miou in enumerate([0.10, 0.14, 0.12]):
        _fake_run(tmp_path / f"glid_s{seed}", {"seg": {"mIoU": miou}}, {"seg": {"mIoU": 0.062}})
    _fake_run(tmp_path / "scratch_s0", {"seg": {"mIoU": 0.20}})
    out = tmp_path / "summary.json"
    r = _run("tools/summarize_runs.py", f"glid={tmp_path}/glid_s*", f"scratch={tmp_path}/scratch_s0", "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "| glid | seg | mIoU | 3 | 0.1200 ± 0.0200 | 0.1000 / 0.1400 / 0.1200 | 0.0620 |" in r.stdout
    rows = json.loads(out.read_text())
    assert [(row["group"], len(row["values"])) for row in rows] == [("glid", 3), ("scratch", 1)]
    assert rows[1]["half_range"] == 0.0 and rows[1]["chance"] is None
    bad = _run("tools/summarize_runs.py", f"x={tmp_path}/nope_s*")
    assert bad.returncode == 2 and "matches no run directory" in bad.stderr
    # Paths the shell already expanded join the group named before them.
    groups = parse_run_groups([f"glid={tmp_path}/glid_s0", str(tmp_path / "glid_s1")])
    assert groups == {"glid": [tmp_path / "glid_s0", tmp_path / "glid_s1"]}
    assert "| glid | seg | mIoU | 2 | 0.1200 ± 0.0200 |" in seed_summary(groups)[0]
    _fake_run(tmp_path / "other_s0", {"depth": {"rmse": 0.6}})
    with pytest.raises(ValueError, match="other_s0 holds metrics depth/rmse.*one group = one setting"):
        seed_summary(parse_run_groups([f"mixed={tmp_path}/glid_s0", str(tmp_path / "other_s0")]))
    with pytest.raises(ValueError, match="comes before any group"):
        parse_run_groups([str(tmp_path / "glid_s0")])


def test_compare_takes_the_best_of_a_learning_rate_sweep_and_links_it(tmp_path):
    moe = _fake_run(tmp_path / "synthetic-s0", {"cls": {"top1": 0.9}, "det": {"mAP": 0.3, "mAP50": 0.5}},
                    {"cls": {"top1": 0.078}, "det": {"mAP": 0.0, "mAP50": 0.0}})
    sweep = {("cls", 5e-4): 0.5, ("cls", 1e-3): 0.7, ("cls", 2e-3): 0.6, ("det", 5e-4): 0.2, ("det", 1e-3): 0.1}
    runs = []
    for (task, lr), v in sweep.items():
        run = _fake_run(tmp_path / f"dense_{task}-lr{lr:g}-s0", {task: {"top1": v} if task == "cls" else
                                                                {"mAP": v, "mAP50": 0.9 - v}})
        (run / "config.json").write_text(json.dumps({"train": {"lr": lr}}))
        runs.append(run)
    (tmp_path / "dense_cls").symlink_to("dense_cls-lr0.0005-s0")  # an older link is replaced
    r = _run("tools/compare.py", moe, *runs, "--link-best", "--json", tmp_path / "c.json")
    assert r.returncode == 0, r.stderr
    assert "cls: best of 3 runs by top1 (lr 0.0005: 50.0, lr 0.001: 70.0, lr 0.002: 60.0)" in r.stdout
    assert "det: best of 2 runs by mAP" in r.stdout  # by mAP, not by the mAP50 that favours the other run
    assert (tmp_path / "dense_cls").resolve() == (tmp_path / "dense_cls-lr0.001-s0").resolve()
    assert (tmp_path / "dense_det").resolve() == (tmp_path / "dense_det-lr0.0005-s0").resolve()
    rows = json.loads((tmp_path / "c.json").read_text())
    assert {(row["task"], row["metric"], row["single_task_dense"]) for row in rows["rows"]} >= {("cls", "top1", 0.7), ("det", "mAP", 0.2)}
    assert rows["baselines"]["cls"]["lr"] == 1e-3


def test_compare_names_a_run_without_config_and_prints_depth_errors_in_metres(tmp_path):
    moe = _fake_run(tmp_path / "grown", {"depth": {"rmse": 0.512, "delta1": 0.8}}, {"depth": {"rmse": 0.9, "delta1": 0.5}})
    with_cfg = _fake_run(tmp_path / "dense_depth-a", {"depth": {"rmse": 0.6, "delta1": 0.7}})
    (with_cfg / "config.json").write_text(json.dumps({"train": {"lr": 1e-3}}))
    no_cfg = _fake_run(tmp_path / "dense_depth-b", {"depth": {"rmse": 0.7, "delta1": 0.75}})
    r = _run("tools/compare.py", moe, with_cfg, no_cfg)
    assert r.returncode == 0, r.stderr
    assert "depth: best of 2 runs by rmse (lr 0.001: 0.600, lr ?: 0.700)" in r.stdout
    row = next(line for line in r.stdout.splitlines() if line.startswith("depth | rmse"))
    assert [c.strip() for c in row.split(" | ")[2:]] == ["0.512", "0.600", "-0.088", "0.900"]  # metres, not x100
    assert "80.0" in next(line for line in r.stdout.splitlines() if "delta1" in line)
