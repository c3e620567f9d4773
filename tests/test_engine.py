"""Training engine: resume equals an uninterrupted run, run directory contents, optimiser groups,
config errors."""
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from moe_vision.engine.builders import prepare_config
from moe_vision.engine.optim import LossWeighting, cosine_with_warmup, param_groups
from moe_vision.engine.steplog import StepLog
from moe_vision.engine.trainer import Trainer

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")


def make_cfg(synthetic_root, out, *overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("train", overrides=[
            "experiment=synthetic", f"data.root={synthetic_root}", "data.synthetic=null", "data.img_size=32",
            "model=moe_vit_nano", "model.img_size=32", "model.moe.num_experts=4",
            "decoder.dim=32", "decoder.num_queries=14", "decoder.num_layers=1", "decoder.num_heads=2",
            "tasks.cls.batch_size=4", "tasks.det.batch_size=4", "tasks.seg.batch_size=4",
            "train.steps=4", "train.warmup_steps=1", "train.ckpt_every=2", "train.log_every=1",
            "eval.batch_size=8", "device=cpu", f"output_dir={out}",
            "train.expert_budget.experts=null",  # every expert open unless a test sets a budget
            *overrides])
    return prepare_config(OmegaConf.to_container(cfg, resolve=True))


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "train_log.jsonl").read_text().splitlines()]


def test_resume_matches_uninterrupted_run(synthetic_root, tmp_path):
    full = Trainer(make_cfg(synthetic_root, tmp_path / "full", "train.sampling.tasks_per_step=1",
                            "train.sampling.strategy=temperature"))
    out = full.fit()
    # The "killed" run: stops after step 2's checkpoint, then a new process resumes it.
    part_cfg = make_cfg(synthetic_root, tmp_path / "part", "train.sampling.tasks_per_step=1",
                        "train.sampling.strategy=temperature")
    first = Trainer(part_cfg)
    steps = StepLog(first.dist)
    for _ in range(2):
        steps.add(first.train_step())
    (tmp_path / "part").mkdir(exist_ok=True)
    with open(tmp_path / "part" / "train_log.jsonl", "a") as f:
        f.writelines(json.dumps(rec) + "\n" for rec in steps.flush())
    first.save()
    torch.manual_seed(1234)  # a different process would start from different RNG state
    resumed = Trainer({**part_cfg, "resume": True})
    resumed.fit()
    assert resumed.step == 4
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")
    for name in ("metrics.json", "expert_usage.json", "expert_usage.png", "model.safetensors", "config.json",
                 "chance_metrics.json", "det_results.json", "curves.png", "predictions.png", "val_log.jsonl"):
        assert (tmp_path / "full" / name).is_file(), name
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert set(metrics) == {"cls", "det", "seg"}
    assert all(0 <= v <= 1 for ms in metrics.values() for v in ms.values())
    assert out["usage"].counts.sum() > 0


def test_existing_run_needs_resume_and_no_half_written_checkpoint(synthetic_root, tmp_path):
    cfg = make_cfg(synthetic_root, tmp_path / "run", "train.steps=1")
    Trainer(cfg).fit()
    with pytest.raises(FileExistsError, match="pass resume=true"):
        Trainer(cfg).fit()
    ckpts = tmp_path / "run" / "checkpoints"
    assert not list(ckpts.glob(".*tmp"))
    assert (ckpts / (ckpts / "latest").read_text()).is_dir()


def test_periodic_validation_uses_a_fixed_random_subset(synthetic_root, tmp_path):
    cfg = make_cfg(synthetic_root, tmp_path / "v", "train.steps=2", "train.eval_every=1", "eval.periodic_images=5")
    trainer = Trainer(cfg)
    subset = trainer.periodic_sets["cls"]
    assert len(subset) == 5 and subset.classes == trainer.val_sets["cls"].classes
    labels = {int(subset[i][1]["label"]) for i in range(5)}
    assert len(labels) > 1  # the val split is sorted by class; the first 5 items would be one class
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "v" / "val_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and [r["subset"] for r in rows] == [True, False]
    assert set(rows[0]["metrics"]) == {"cls", "det", "seg"}


@pytest.mark.parametrize("override, message", [
    ("train.steps=-3", r"train.steps=-3 must be positive"),
    ("train.steps=0", r"train.steps=0 must be positive"),
    ("train.lr=0", r"train.lr=0 must be positive"),
    ("train.lr=-0.1", r"train.lr=-0.1 must be positive"),
    ("tasks.det.batch_size=0", r"tasks.det.batch_size=0 must be a positive integer"),
    ("train.warmup_steps=-1", r"train.warmup_steps=-1 must be >= 0"),
])
def test_nonsense_training_values_are_refused(synthetic_root, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        Trainer(make_cfg(synthetic_root, tmp_path / "bad", override))
    assert not (tmp_path / "bad").exists()


def test_config_errors(synthetic_root, tmp_path):
    cfg = make_cfg(synthetic_root, tmp_path / "x")
    del cfg["data"]["tasks"]["det"]
    with pytest.raises(ValueError, match=r"task 'det' has no dataset: add data.tasks.det"):
        Trainer(cfg)
    with pytest.raises(ValueError, match=r"single_task='pose' is not among"):
        make_cfg(synthetic_root, tmp_path / "y", "+single_task=pose")
    cfg = make_cfg(synthetic_root, tmp_path / "z", "tasks.cls.num_classes=7")
    with pytest.raises(ValueError, match=r"tasks.cls.num_classes=7 but the cls dataset has 13 classes"):
        Trainer(cfg)


def test_param_groups_schedule_and_uncertainty_weighting():
    import timm
    model = timm.create_model("moe_vit_nano_patch8", tasks=["a"], depth=2)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "task_embed.a" in no_decay_names and "pos_embed" in no_decay_names
    assert "blocks.1.mlp.router.gates.a.weight" in no_decay_names
    assert all(names[id(p)].endswith(("weight", "w1", "w2")) for p in decay["params"])
    model.blocks[0].attn.qkv.weight.requires_grad_(False)
    assert all(p.requires_grad for g in param_groups(model, 0.05) for p in g["params"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_with_warmup(opt, 2, 10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(), sched.step()
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[-1] < 0.05
    w = LossWeighting({"a": 2.0}, "uncertainty")
    torch.testing.assert_close(w("a", torch.tensor(3.0)), torch.tensor(6.0))
    with pytest.raises(ValueError, match="loss_weighting"):
        LossWeighting({"a": 1.0}, "magic")


def test_layer_wise_learning_rate_decay():
    import timm
    model = torch.nn.Module()
    model.backbone = timm.create_model("moe_vit_nano_patch8", tasks=["a"], depth=2)
    model.decoder = torch.nn.Linear(4, 4)
    model.heads = torch.nn.ModuleDict({"a": torch.nn.Linear(4, 2)})
    plain = param_groups(model, 0.05, lr=1.0, head_lr_mult=5.0)
    groups = param_groups(model, 0.05, lr=1.0, head_lr_mult=5.0, layer_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    lr_of = {names[id(p)]: g.get("lr", 1.0) for g in groups for p in g["params"]}
    assert len(lr_of) == len(names)  # every parameter once
    # 2 blocks: stem and embeddings at 0.5^3, block 0 at 0.5^2, block 1 at 0.5, the rest at 1, heads x5.
    assert lr_of["backbone.pos_embed"] == lr_of["backbone.task_embed.a"] == 0.125
    stem = [v for n, v in lr_of.items() if n.startswith("backbone.patch_embed.")]
    assert stem and all(v == 0.125 for v in stem)
    assert lr_of["backbone.blocks.0.attn.qkv.weight"] == 0.25
    assert lr_of["backbone.blocks.1.mlp.router.gates.a.weight"] == 0.5
    assert lr_of["backbone.norm.weight"] == lr_of["decoder.weight"] == 1.0
    assert lr_of["heads.a.weight"] == lr_of["heads.a.bias"] == 5.0
    # Off (1.0): the same groups as without the option.
    same = param_groups(model, 0.05, lr=1.0, head_lr_mult=5.0, layer_decay=1.0)
    assert [(len(g["params"]), g.get("lr")) for g in same] == [(len(g["params"]), g.get("lr")) for g in plain]
    with pytest.raises(ValueError, match=r"train.layer_decay=1.5; expected a value in \(0, 1\]"):
        param_groups(model, 0.05, layer_decay=1.5)


def test_low_label_budget_and_head_learning_rate(synthetic_root, tmp_path):
    trainer = Trainer(make_cfg(synthetic_root, tmp_path / "ll", "data.max_train_images=5", "train.head_lr_mult=5"))
    assert {t: len(d) for t, d in trainer.train_sets.items()} == {"cls": 5, "det": 5, "seg": 5}
    base = float(trainer.tcfg["lr"])
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    heads = [g for g in trainer.optimizer.param_groups if g["lr"] == pytest.approx(5 * base)]
    others = [g for g in trainer.optimizer.param_groups if g["lr"] == pytest.approx(base)]
    assert heads and all(names[id(p)].startswith("heads.") for g in heads for p in g["params"])
    assert all(not names.get(id(p), "").startswith("heads.") for g in others for p in g["params"])
    assert sum(len(g["params"]) for g in heads) == sum(1 for n in names.values() if n.startswith("heads."))
