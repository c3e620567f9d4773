"""Extraction (lossless slicing), bundles, adding a task with frozen old parameters, fine-tuning."""
import json
from pathlib import Path

import pytest
import torch

from moe_vision.models import save_model
from moe_vision.surgery.bundle import load_bundle, read_bundle_info
from moe_vision.surgery.continual import add_task, bit_identical, outputs_on_probe
from moe_vision.surgery.extract import extract_task
from moe_vision.surgery.finetune import set_trainable
from moe_vision.surgery.pipeline import extract_bundle
from moe_vision.surgery.select import select_layer
from moe_vision.tasks import GeneralistModel
from tests.test_engine import make_cfg
from moe_vision.engine.trainer import Trainer

TASKS = {"cls": {"num_classes": 5}, "det": {"num_classes": 4}, "seg": {"num_classes": 3}}
DEC = {"dim": 32, "num_queries": 14, "num_layers": 2, "num_heads": 2}


def _model(**moe):
    import timm
    bb = timm.create_model("moe_vit_nano_patch8", tasks=list(TASKS), img_size=32,
                           moe={"num_experts": 6, "mlp_blocks": "all", **moe})
    torch.manual_seed(1)
    m = GeneralistModel(bb, TASKS, DEC).eval()
    with torch.no_grad():  # spread routers so tasks pick different experts
        for name, p in m.named_parameters():
            if ".router.gates." in name:
                p.normal_(std=0.5)
    return m


def test_select_rules():
    c = torch.tensor([50.0, 0, 30, 15, 5, 0])
    assert select_layer(c, "selected", None, 2) == [0, 2, 3, 4]
    assert select_layer(c, "threshold", 0.1, 2) == [0, 2, 3]
    assert select_layer(c, "coverage", 0.8, 2) == [0, 2]
    assert select_layer(c, "coverage", 0.95, 2) == [0, 2, 3]
    assert select_layer(c, "top_n", 3, 2) == [0, 2, 3]
    with pytest.raises(ValueError, match=r"layer L: rule threshold=0.4 keeps 1 expert\(s\) \[0\], fewer than top_k=2"):
        select_layer(c, "threshold", 0.4, 2, "L")
    with pytest.raises(ValueError, match="unknown selection rule"):
        select_layer(c, "magic", 1, 2)


@pytest.mark.parametrize("attn", ["none", "last_2"])
def test_extraction_with_selected_experts_is_bit_identical(attn):
    model = _model(attn_blocks=attn, attn_num_experts=16, attn_top_k=3, num_experts=16)
    x = torch.randn(1, 3, 32, 32)
    _, routing = model(x, "det", return_routing=True)
    kept = {r.layer: sorted(set(r.idx_TK.flatten().tolist())) for r in routing}
    assert any(len(k) < 16 for k in kept.values())
    small = extract_task(model, "det", kept).eval()
    assert small.tasks == ["det"] and small.backbone.tasks == ["det"]
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    a, b = model(x, "det"), small(x, "det")
    for k in ("logits", "boxes"):
        assert torch.equal(a[k], b[k])
    # Dropping an expert the task did use changes the outputs: the check is not vacuous.
    layer = next(iter(kept))
    cut = dict(kept, **{layer: kept[layer][1:]}) if len(kept[layer]) > 2 else None
    if cut:
        assert not torch.equal(extract_task(model, "det", cut)(x, "det")["logits"], a["logits"])


def test_add_task_freezes_old_parameters_and_keeps_outputs_bit_identical():
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    before = outputs_on_probe(model, ["cls", "det", "seg"], x)
    grown = add_task(model, "depth", {"type": "depth"}, new_experts=2)
    trainable = {n for n, p in grown.named_parameters() if p.requires_grad}
    assert trainable and all(("added_experts.0." in n or ".depth" in n or n.startswith("heads.depth"))
                             for n in trainable)
    assert all(not p.requires_grad for n, p in grown.named_parameters() if n in model.state_dict())
    opt = torch.optim.AdamW([p for p in grown.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    grown.train()
    for _ in range(3):  # train the new task hard
        out, routing = grown(x, "depth", return_routing=True)
        loss = out["log_depth"].square().mean() + grown.backbone.aux_losses(routing).total
        opt.zero_grad()
        loss.backward()
        opt.step()
    new_w = grown.backbone.blocks[1].mlp.added_experts[0].w1
    assert new_w.grad is not None and new_w.grad.abs().sum() > 0
    after = outputs_on_probe(grown, ["cls", "det", "seg"], x)
    assert bit_identical(before, after)
    # The new task's router chooses among old and new experts.
    assert grown.backbone.blocks[1].mlp.router.gates["depth"].out_features == 8
    assert grown.backbone.blocks[1].mlp.router.gates["cls"].out_features == 6
    with pytest.raises(ValueError, match="already exists"):
        add_task(grown, "cls", {"type": "cls", "num_classes": 5})


def test_added_task_can_be_extracted_and_checkpointed(tmp_path):
    grown = add_task(_model(), "seg2", {"type": "seg", "num_classes": 3}, new_experts=2).eval()
    x = torch.randn(2, 3, 32, 32)
    path = save_model(grown, tmp_path / "g.safetensors")
    from moe_vision.models import load_model
    again = load_model(path).eval()
    assert torch.equal(again(x, "seg2")["masks"], grown(x, "seg2")["masks"])
    _, routing = grown(x, "seg2", return_routing=True)
    kept = {r.layer: sorted(set(r.idx_TK.flatten().tolist()) | {0, 1}) for r in routing}
    small = extract_task(grown, "seg2", kept).eval()
    assert torch.equal(small(x, "seg2")["masks"], grown(x, "seg2")["masks"])


def test_set_trainable_groups():
    model = _model()
    counts = set_trainable(model, "head")
    assert all(n.startswith("heads.") for n, p in model.named_parameters() if p.requires_grad)
    assert counts["trainable"] < counts["total"]
    set_trainable(model, "router+head")
    assert any(".router." in n for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="--trainable"):
        set_trainable(model, "norms")


def test_extract_bundle_end_to_end_and_bad_inputs(synthetic_root, tmp_path):
    run = tmp_path / "run"
    Trainer(make_cfg(synthetic_root, run, "train.steps=2")).fit()
    out = tmp_path / "experts" / "det"
    info = extract_bundle(run, "det", out, "selected", latency_calls=4, log=lambda m: None)
    assert info["lossless_check"]["identical"] is True
    from moe_vision.exactness import mkl_mode  # what the check ran under is recorded and on the card
    assert info["lossless_check"]["conditions"] == {"mkl_cbwr": mkl_mode(), "torch": torch.__version__}
    assert f"torch {torch.__version__}" in (out / "README.md").read_text()
    assert info["params"]["bundle"] <= info["params"]["full"]
    assert set(info["metrics"]["full"]["det"]) == {"mAP", "mAP50"}
    assert info["metrics"]["full"] == info["metrics"]["bundle"]
    assert read_bundle_info(out)["parent_sha256"] == info["parent_sha256"]
    model = load_bundle(out, parent_checkpoint=run)
    assert model.tasks == ["det"]
    with pytest.raises(FileExistsError, match="pass --force"):
        extract_bundle(run, "det", out, "selected", latency_calls=4, log=lambda m: None)
    with pytest.raises(KeyError, match=r"unknown task 'pose'; this model knows tasks \['cls', 'det', 'seg'\]"):
        extract_bundle(run, "pose", tmp_path / "x", "selected", latency_calls=4, log=lambda m: None)
    with pytest.raises(ValueError, match="fewer than top_k"):
        extract_bundle(run, "det", tmp_path / "y", "threshold", 0.99, latency_calls=4, log=lambda m: None)
    assert not (tmp_path / "y").exists()
    other = save_model(_model(), tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="was not extracted from"):
        load_bundle(out, parent_checkpoint=other)
    info_path = out / "bundle.json"
    d = json.loads(info_path.read_text())
    (out / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ValueError, match="does not match the sha256"):
        load_bundle(out)
    (out / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="incomplete: model.safetensors is missing"):
        load_bundle(out)
    assert d["task"] == "det"


def _demo_shaped_model():
    """The demo's architecture (conv stem, 4 blocks, top-2 of 8 half-width experts every 2nd
    block) whose det router in blocks.3.mlp never picks expert 4 and often sees experts 3 and 5
    tie: their gate rows are equal up to a difference far below a logit's float32 resolution."""
    import omegaconf
    from moe_vision.models import build_model
    cfg = omegaconf.OmegaConf.to_container(omegaconf.OmegaConf.load(Path(__file__).parents[1]
                                                                    / "configs/model/moe_vit_demo.yaml"))
    cfg["moe"].pop("aux_weights")
    torch.manual_seed(0)
    model = GeneralistModel(build_model(cfg, ["det", "seg"]), {"det": {"num_classes": 4}, "seg": {"num_classes": 3}},
                            DEC).eval()
    block = model.backbone.blocks[3]
    with torch.no_grad():
        block.norm2.bias[0] = 20.0  # every token's router input has a large first component ...
        gate = block.mlp.router.gates["det"].weight  # [E, D]
        gate.normal_(std=0.02)
        gate[:, 0] = torch.tensor([0.0, 0.0, 0.0, 0.3, -1.0, 0.3, 0.0, 0.5])  # ... so 4 is always last
        gate[5, 1:] = gate[3, 1:] + 3e-9 * torch.randn(gate.shape[1] - 1)
    return model


def test_selected_bundle_is_bit_identical_when_experts_tie_on_a_padded_batch():
    """The demo run's regression: two experts with equal logits on some tokens, an unused expert
    between them; ``torch.topk`` broke the tie differently once the unused one was cut out."""
    from moe_vision.moe import ExpertUsage
    model = _demo_shaped_model()
    torch.manual_seed(1)
    images = torch.randn(3, 3, 64, 64)
    sizes = torch.tensor([[64, 64], [48, 40], [56, 64]])  # a padded batch: the model sees each image's region only
    images[1, :, 48:], images[1, :, :, 40:], images[2, :, 56:] = 0, 0, 0
    router = model.backbone.blocks[3].mlp.router
    seen = []
    hook = router.register_forward_hook(lambda mod, inp, r: seen.append(r.logits_TE))
    out, routing = model(images, "det", return_routing=True, input_sizes=sizes)
    hook.remove()
    logits_TE = seen[0]
    assert logits_TE.shape[0] < 3 * 65  # padding tokens never reach the router
    tied = (logits_TE[:, 3] == logits_TE[:, 5]).sum()
    assert 0 < tied < len(logits_TE)  # exact float32 ties on some tokens, a strict order on others
    usage = ExpertUsage(model.backbone.moe_layers(), ["det"])
    usage.update(routing)
    kept = {layer: select_layer(usage.counts[i, 0], "selected", None, 2, layer) for i, layer in enumerate(usage.layers)}
    assert {3, 5} <= set(kept["blocks.3.mlp"]) and 4 not in kept["blocks.3.mlp"], kept
    small = extract_task(model, "det", kept).eval()
    out_small = small(images, "det", input_sizes=sizes)
    for k in ("logits", "boxes"):
        assert torch.equal(out[k], out_small[k]), k


def test_extraction_refuses_options_its_rule_would_ignore_and_a_check_over_no_image(tiny_run, synthetic_root, tmp_path):
    import re
    import shutil
    run, quiet = tiny_run / "run", (lambda m: None)
    refused = [
        (dict(rule="allowed", value=2), "--value 2 applies to --rule threshold/coverage/top_n/search only; rule "
                                        "allowed takes no value"),
        (dict(rule="search"), "--rule search needs --value"),
        (dict(rule="top_n", value=2.5), "--rule top_n --value 2.5: expected a whole number of experts per layer"),
        (dict(rule="selected", search_error="layer"), "--search-error layer applies to --rule search only"),
        (dict(rule="top_n", value=2, dense=True), "--rule top_n does not apply to --dense"),
        (dict(calibration_images=-1), "--calibration-images -1: expected 0 (all) or more"),
    ]
    for options, message in refused:
        with pytest.raises(ValueError, match=re.escape(message)):
            extract_bundle(run, "det", tmp_path / "x", latency_calls=4, log=quiet, **options)
    assert not (tmp_path / "x").exists()
    # A split with no image: before, the lossless check passed over nothing and said "identical".
    data = shutil.copytree(synthetic_root, tmp_path / "data")
    ann = data / "det" / "annotations" / "instances_val.json"
    ann.write_text(json.dumps({**json.loads(ann.read_text()), "images": [], "annotations": []}))
    with pytest.raises(ValueError, match="instances_val.json lists no images"):  # the reader says so ...
        extract_bundle(run, "det", tmp_path / "x", data_root=str(data), latency_calls=4, log=quiet)
    assert not (tmp_path / "x").exists()
    from moe_vision.engine.builders import load_generalist
    from moe_vision.surgery.pipeline import outputs_identical
    full = load_generalist(run)[0]
    with pytest.raises(ValueError, match="the lossless check of 'det' has no image to compare"):  # ... and the check
        outputs_identical(full, full, "det", [])


def test_extract_experts_tool_prints_one_line_for_an_ignored_option(tiny_run, tmp_path):
    from tests.tool_run import run_child
    r = run_child("extract_experts.py", "--task", "det", "--checkpoint", tiny_run / "run", "--out", tmp_path / "x",
                  "--rule", "allowed", "--value", "2")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --value 2 applies to --rule threshold/coverage/top_n/search only; rule allowed takes no value"]


def test_a_bundle_records_what_its_check_compared_and_times_both_models_in_turn(tiny_run):
    info = read_bundle_info(tiny_run / "experts" / "det")
    check = info["lossless_check"]["per_task"]["det"]
    assert check == {"identical": True, "max_abs_diff": 0.0, "split": "train", "images": 12}  # selected: its calibration
    latency = info["latency_ms"]
    assert latency["calls"] == 4 and latency["alternating"]  # (as the fixture asked; the tool's default is 60)
    for model in ("full", "bundle"):
        for batch in ("batch1", "batch8"):
            q1, q3 = latency["quartiles"][model][batch]
            assert 0 < q1 <= latency[model][batch] <= q3
    card = (tiny_run / "experts" / "det" / "README.md").read_text()
    assert "medians (quartiles) of 4 calls, the two models called in turn" in card
    assert "outputs bit-identical on the 12 images of the `train` split it was checked on" in card
