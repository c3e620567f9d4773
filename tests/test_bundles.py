"""Bundles that travel: several tasks in one bundle, dense specialists (folded experts, timm-loadable,
distilled), model cards and archives."""
import json
import tarfile

import pytest
import torch

import moe_vision
from moe_vision.surgery.bundle import bundle_task, load_bundle, read_bundle_info
from moe_vision.surgery.densify import distill, fold, mean_gates, student_gap, timm_model_args, timm_state_dict
from moe_vision.surgery.extract import extract_task, union_of
from moe_vision.surgery.pipeline import extract_bundle
from moe_vision.tasks import GeneralistModel

DEC = {"dim": 32, "num_queries": 14, "num_layers": 1, "num_heads": 2}
TASKS = {"cls": {"num_classes": 5}, "det": {"num_classes": 4}, "seg": {"num_classes": 3}}


def _model(num_experts=4, granularity=2, spread=True, **backbone):
    import timm
    torch.manual_seed(0)
    bb = timm.create_model("moe_vit_nano_patch8", tasks=list(TASKS), img_size=32,
                           moe={"num_experts": num_experts, "granularity": granularity, "mlp_blocks": "all"},
                           **backbone)
    m = GeneralistModel(bb, TASKS, DEC).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if ".router.gates." in name:
                p.normal_(std=0.5 if spread else 0.0)
    return m


def test_a_two_task_bundle_equals_the_full_model_per_task():
    model = _model(num_experts=16)
    x = torch.randn(1, 3, 32, 32)
    kept_per_task = {}
    for task in ("det", "seg"):
        _, routing = model(x, task, return_routing=True)
        kept_per_task[task] = {r.layer: sorted(set(r.idx_TK.flatten().tolist())) for r in routing}
    kept = union_of(kept_per_task)
    assert any(len(k) < 16 for k in kept.values())  # something was cut
    assert any(set(kept_per_task["det"][layer]) != set(kept_per_task["seg"][layer]) for layer in kept)
    small = extract_task(model, ["det", "seg"], kept).eval()
    assert small.tasks == ["det", "seg"] and small.backbone.tasks == ["det", "seg"]
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    for task, keys in (("det", ("logits", "boxes")), ("seg", ("masks",))):
        a, b = model(x, task), small(x, task)
        for k in keys:
            assert torch.equal(a[k], b[k]), (task, k)
    with pytest.raises(KeyError, match="unknown task 'cls'"):
        small(x, "cls")


def test_folding_is_exact_when_every_token_has_the_same_gates():
    """Two experts, top-2, a router that gives every token 0.5 / 0.5: the dense MLP is the MoE layer."""
    model = _model(num_experts=2, spread=False)
    x = torch.randn(2, 3, 32, 32)
    gates = mean_gates(model, "det", [(x, [{} for _ in range(2)])])
    assert all(torch.allclose(g, torch.tensor([0.5, 0.5])) for g in gates.values())
    dense, kept = fold(model, "det", gates)
    assert not dense.backbone.moe_layers() and all(k["experts"] == [0, 1] for k in kept.values())
    layer, mlp = model.backbone.blocks[1].mlp, dense.backbone.blocks[1].mlp
    h = torch.randn(50, 96)
    torch.testing.assert_close(mlp(h), layer(h, "det")[0], atol=1e-6, rtol=1e-6)
    for k in ("logits", "boxes"):
        torch.testing.assert_close(dense(x, "det")[k], model(x, "det")[k], atol=1e-5, rtol=1e-5)


def test_a_dense_vit_s_specialist_loads_into_timm_and_gives_the_same_features():
    import timm
    torch.manual_seed(0)
    bb = timm.create_model("moe_vit_small_patch16", tasks=["cls"], moe={"num_experts": 4, "granularity": 2})
    model = GeneralistModel(bb, {"cls": {"num_classes": 10}}, DEC).eval()
    with torch.no_grad():
        model.backbone.task_embed["cls"].normal_(std=0.02)
    gates = {layer: torch.tensor([0.6, 0.3, 0.1, 0.0]) for layer in model.backbone.moe_layers()}
    dense, _ = fold(model, "cls", gates)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    assert timm_model_args(dense)["embed_dim"] == 384
    result = vit.load_state_dict(timm_state_dict(dense, "cls"), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(vit.eval().forward_features(x), dense.backbone.forward_tokens(x, "cls"),
                                   atol=1e-5, rtol=1e-5)


def test_distillation_lowers_the_gap_to_the_moe_model():
    model = _model(num_experts=4)  # spread routing: the mean gates are only an approximation
    torch.manual_seed(1)
    batches = [(torch.randn(4, 3, 32, 32), [{} for _ in range(4)]) for _ in range(4)]
    dense, _ = fold(model, "seg", mean_gates(model, "seg", batches))
    before = student_gap(dense, model, "seg", batches)
    losses = distill(dense, model, "seg", batches, steps=30, lr=1e-3)
    after = student_gap(dense, model, "seg", batches)
    assert before > 0 and after < 0.7 * before, (before, after)
    assert losses[-1] < losses[0]
    assert all(p.requires_grad for p in dense.parameters())  # the model is handed back trainable


@pytest.fixture(scope="module")
def bundles(synthetic_root, tmp_path_factory):
    """A 2-step cls + det + seg run whose experts fold (top_k = granularity), and its bundles."""
    from moe_vision.engine.trainer import Trainer
    from tests.test_engine import make_cfg
    base = tmp_path_factory.mktemp("bundles")
    Trainer(make_cfg(synthetic_root, base / "run", "train.steps=2", "eval.periodic_images=0",
                     "model.moe.granularity=2")).fit()
    quiet = (lambda m: None)
    infos = {"detseg": extract_bundle(base / "run", "det,seg", base / "detseg", latency_calls=4, log=quiet, archive=True),
             "dense": extract_bundle(base / "run", "det", base / "dense", dense=True, distill_steps=2,
                                     distill_split="val", latency_calls=4, log=quiet)}
    return base, infos


def test_the_tool_writes_a_two_task_bundle_with_a_card_and_an_archive(bundles):
    base, infos = bundles
    info = infos["detseg"]
    assert info["tasks"] == ["det", "seg"] and info["lossless_check"]["identical"]
    assert set(info["kept_experts_per_task"]) == {"det", "seg"}
    assert info["kept_experts"] == union_of(info["kept_experts_per_task"])
    assert set(info["metrics"]["bundle"]) == {"det", "seg"}
    assert info["metrics"]["bundle"] == info["metrics"]["full"]
    # The archive opens directly, checked, and is the same model as the folder.
    archive = base / "detseg.tar.gz"
    assert info["archive"] == str(archive)
    a, b = load_bundle(archive), load_bundle(base / "detseg")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(a(x, "seg")["masks"], b(x, "seg")["masks"])
    assert read_bundle_info(archive)["model_sha256"] == b.bundle_info["model_sha256"]
    with pytest.raises(ValueError, match="choose one with --task"):
        bundle_task(a.bundle_info)
    assert bundle_task(a.bundle_info, "seg") == "seg"


def test_a_tampered_archive_is_refused(bundles, tmp_path):
    base, _ = bundles
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(base / "detseg.tar.gz") as src, tarfile.open(bad, "w:gz") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name == "model.safetensors":
                data = data[:-1] + bytes([data[-1] ^ 1])
            member.size = len(data)
            import io
            dst.addfile(member, io.BytesIO(data))
    with pytest.raises(ValueError, match="does not match the sha256 in bundle.json"):
        load_bundle(bad)
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as dst:
        dst.add(base / "detseg" / "bundle.json", arcname="../bundle.json")
    with pytest.raises(ValueError, match="holds '../bundle.json'; expected only"):
        load_bundle(evil)


def test_the_model_card_says_what_bundle_json_says(bundles):
    base, infos = bundles
    for name in ("detseg", "dense"):
        card = (base / name / "README.md").read_text()
        info = json.loads((base / name / "bundle.json").read_text())
        assert info["parent_sha256"] in card and info["parent_checkpoint"] in card
        for task in info["tasks"]:
            for metric, value in info["metrics"]["bundle"][task].items():
                assert f"| {task} | {metric}" in card and f"{100 * value:.1f}" in card
        for layer, kept in info["kept_experts"].items():
            assert f"| {layer} | {len(kept)} / {info['num_experts'][layer]} | {kept} |" in card
        assert "moe_vision.load_bundle" in card and "## Limits" in card


def test_a_dense_bundle_has_no_moe_and_predicts(bundles, synthetic_root):
    base, infos = bundles
    info = infos["dense"]
    assert info["kind"] == "dense" and all(len(k) == 2 for k in info["kept_experts"].values())
    assert info["dense"]["distill_steps"] == 2 and "metrics_folded" in info["dense"]
    model = load_bundle(base / "dense")
    assert not model.backbone.moe_layers() and not any(".experts." in n for n, _ in model.named_parameters())
    image = next((synthetic_root / "det" / "val").glob("*.png"))
    pred = moe_vision.predict(model, "det", [image])[0]
    assert set(pred) >= {"boxes", "scores", "labels"}
    with pytest.raises(ValueError, match="--dense makes a specialist of one task"):
        extract_bundle(base / "run", "det,seg", base / "x", dense=True, latency_calls=4, log=lambda m: None)
