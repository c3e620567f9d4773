"""Multi-task balance: the transfer diagnosis (gradients per shared group, routing, loss curves
against dense runs) and the balancing options."""
import json
from pathlib import Path

import pytest
import torch

from moe_vision.engine.balance import GradientBalance, normalized_sum, pcgrad
from moe_vision.engine.transfer import SHARED_GROUPS, findings, group_of
from tests.tool_run import run_tool

ROOT = Path(__file__).resolve().parents[1]


def test_parameter_groups_keep_task_owned_parameters_out():
    assert group_of("backbone.patch_embed.stem.0.weight") == "patch stem"
    assert group_of("backbone.blocks.1.mlp.experts.w1") == "experts"
    assert group_of("backbone.blocks.0.mlp.fc1.weight") == "non-expert MLPs"
    assert group_of("backbone.blocks.2.attn.qkv.weight") == "attention"
    assert group_of("decoder.query_embed") == "queries"
    assert group_of("decoder.layers.0.cross_attn.in_proj_weight") == "query decoder"
    assert group_of("pixel_decoder.lateral.0.weight") == "pixel decoder"
    for owned in ("heads.det.class_embed.weight", "backbone.task_embed.det",
                  "backbone.blocks.1.mlp.router.gates.det.weight"):
        assert group_of(owned) is None
    assert group_of("backbone.blocks.1.mlp.router.gates.shared.weight") == "routers (shared)"


def test_findings_name_the_fighting_pair_and_thin_routing():
    report = {"groups": {"query decoder": {"cosine": {"det|seg": -0.3, "cls|det": 0.1}}},
              "routing": {"det": {"blocks.1.mlp": {"tokens_with_last_weight_below_0.05": 0.9}},
                          "seg": {"blocks.1.mlp": {"tokens_with_last_weight_below_0.05": 0.1}}},
              "curves": {"det": {"final": 9.0, "dense_final": 8.0}}}
    out = findings(report)
    assert out[0] == "det and seg pull query decoder in opposing directions (cosine -0.30)"
    assert any(f.startswith("det gives its last expert choice") and "blocks.1.mlp" in f for f in out)
    assert not any(f.startswith("seg gives") for f in out)
    assert any("det's training loss ends +12% above its dense run's" in f for f in out)


def test_diagnose_transfer_prints_a_row_per_shared_group_and_task_pair(tiny_run, synthetic_root, tmp_path):
    from moe_vision.engine.trainer import Trainer
    from tests.test_engine import make_cfg
    dense = tmp_path / "dense_det"
    Trainer(make_cfg(synthetic_root, dense, "+single_task=det", "train.sampling.tasks_per_step=1", "train.steps=2", "eval.periodic_images=0")).fit()
    r = run_tool("diagnose_transfer.py", tiny_run / "run", "--dense", dense, "--batches", "1", "--out",
                 tmp_path / "report")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    header = next(line for line in lines if line.startswith("group"))
    for pair in ("cos cls-det", "cos cls-seg", "cos det-seg"):
        assert pair in header
    rows = {line.split("  ")[0] for line in lines if line and line.split("  ")[0] in dict(SHARED_GROUPS)}
    assert rows >= {"patch stem", "attention", "experts", "non-expert MLPs", "pixel decoder", "query decoder"}
    assert "where tasks fight:" in r.stdout
    report = json.loads((tmp_path / "report" / "transfer.json").read_text())
    assert set(report["routing"]) == {"cls", "det", "seg"} and "dense_final" in report["curves"]["det"]
    assert (tmp_path / "report" / "transfer_curves.png").is_file()
    bad = run_tool("diagnose_transfer.py", dense)
    assert bad.returncode == 2 and "trained one task (det)" in bad.stderr


def test_pcgrad_removes_the_conflicting_component_and_keeps_agreeing_gradients():
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])  # dot -1: they conflict
    out = pcgrad(g, torch.Generator().manual_seed(0))
    # g0 loses its part along g1 ([0.5, 0.5], now orthogonal to g1), g1 its part along g0 ([0, 1]).
    torch.testing.assert_close(out, torch.tensor([0.5, 1.5]))
    agree = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(pcgrad(agree), agree.sum(0))


def test_normalize_gives_every_task_the_mean_norm():
    g = torch.tensor([[1.0, 0.0], [0.0, 3.0], [0.0, 0.0]])  # a task without gradient here stays out
    torch.testing.assert_close(normalized_sum(g), torch.tensor([2.0, 2.0]))


class _TwoTasks(torch.nn.Module):
    """A shared layer (named like the pixel decoder, a shared group) and a head per task."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.pixel_decoder = torch.nn.Linear(4, 4)
        self.heads = torch.nn.ModuleDict({"a": torch.nn.Linear(4, 1), "b": torch.nn.Linear(4, 1)})

    def losses(self, x):
        h = self.pixel_decoder(x)
        return {"a": self.heads["a"](h).sum(), "b": -10 * self.heads["b"](h).sum()}


def test_balanced_backward_changes_only_the_shared_gradients_as_it_claims():
    x = torch.randn(3, 4)
    per_task = {}
    for t in ("a", "b"):
        m = _TwoTasks()
        m.losses(x)[t].backward()
        per_task[t] = torch.cat([p.grad.reshape(-1) for p in m.pixel_decoder.parameters()])
    for method, expected in (("normalize", normalized_sum(torch.stack(list(per_task.values())))),
                             ("none", sum(per_task.values()))):
        m = _TwoTasks()
        losses = m.losses(x)
        GradientBalance(m, method).backward(sum(losses.values()), (losses, torch.zeros(())))
        got = torch.cat([p.grad.reshape(-1) for p in m.pixel_decoder.parameters()])
        torch.testing.assert_close(got, expected)
        assert m.heads["b"].weight.grad is not None  # a task's own head keeps its gradient
    with pytest.raises(ValueError, match="train.balance='magic'; expected one of"):
        GradientBalance(_TwoTasks(), "magic")


@pytest.mark.parametrize("option", ["train.balance=pcgrad", "train.balance=normalize", "model.task_norm=affine"])
def test_each_balancing_option_trains(synthetic_root, tmp_path, option):
    from moe_vision.engine.trainer import Trainer
    from tests.test_engine import make_cfg
    trainer = Trainer(make_cfg(synthetic_root, tmp_path / "run", option, "model.stem=conv", "model.stem_depth=1",
                               "train.steps=2", "train.ckpt_every=0", "eval.max_batches=1",
                               "eval.periodic_images=0"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.fit()
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)]
    assert any(n.startswith("pixel_decoder.") for n in moved) and any(n.startswith("heads.det") for n in moved)
    if option == "model.task_norm=affine":
        norms = [m for m in trainer.model.modules() if type(m).__name__ == "TaskBatchNorm2d"]
        assert norms and all(set(m.per_task) == {"cls", "det", "seg"} for m in norms)
        stats = {t: norms[0].per_task[t].running_mean for t in ("cls", "det", "seg")}
        assert not torch.equal(stats["cls"], stats["det"])  # each task's own statistics
        assert any(".per_task.det.weight" in n for n in moved)  # and its own scale


def test_task_norm_statistics_follow_the_task_into_a_bundle():
    import timm
    from moe_vision.surgery.extract import extract_task
    from moe_vision.tasks import GeneralistModel
    torch.manual_seed(0)
    bb = timm.create_model("moe_vit_nano_patch8", tasks=["det", "seg"], img_size=32, stem="conv",
                           task_norm="stats", moe={"num_experts": 4})
    model = GeneralistModel(bb, {"det": {"num_classes": 4}, "seg": {"num_classes": 3}},
                            {"dim": 32, "num_queries": 8, "num_layers": 1, "num_heads": 2})
    model.train()
    model(torch.randn(2, 3, 32, 32), "det")
    model(torch.randn(2, 3, 32, 32) * 3 + 1, "seg")
    model.eval()
    small = extract_task(model, "seg", {layer: list(range(4)) for layer in model.backbone.moe_layers()}).eval()
    assert not any(".per_task.det." in k for k in small.state_dict())
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(small(x, "seg")["masks"], model(x, "seg")["masks"])
