"""Pre-training: MIM masking and targets, the query-mask objective, the pre-training tool (run
directory, exact resume), fine-tuning from it (init_from, head-only) and bad input."""
from __future__ import annotations

import json
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

from moe_vision.pretrain import (UnlabelledImages, images_under, mask_image, normalised_patches, patchify,
                                 random_patch_mask, unpatchify)
from moe_vision.pretrain.masking import num_masked
from moe_vision.engine.optim import set_trainable
from moe_vision.pretrain.transfer import init_from_pretrained
from tests.tool_run import run_tool

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.synthetic=null", "data.img_size=32", "model=moe_vit_nano", "model.img_size=32",
         "model.moe.num_experts=4", "decoder.dim=32", "decoder.num_queries=14", "decoder.num_layers=1",
         "decoder.num_heads=2", "train.warmup_steps=1", "train.log_every=1", "eval.max_batches=1",
         "eval.batch_size=8", "eval.periodic_images=0", "device=cpu"]


_tool = run_tool


def _pretrain(root: Path, out: Path, *extra) -> subprocess.CompletedProcess:
    return _tool("pretrain.py", "experiment=pretrain_glid", *SMALL, f"data.root={root}", f"output_dir={out}",
                 "tasks.pretrain.batch_size=8", "train.steps=4", "train.ckpt_every=2", "train.keep_checkpoints=3",
                 "train.eval_every=0", *extra)


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines())}


def _tiny_mim_model(encoder: str = "visible"):
    from moe_vision.engine.builders import build_generalist
    cfg = {"model": {"name": "moe_vit_nano_patch8", "img_size": 32, "moe": {"num_experts": 4, "mlp_blocks": "all"}},
           "tasks": {"pretrain": {"type": "mim", "patch_size": 8, "mask_ratio": 0.75, "encoder": encoder}},
           "decoder": {"dim": 32, "num_queries": 4, "num_layers": 1, "num_heads": 2}}
    return build_generalist(cfg)


# ------------------------------------------------------------------ masking and targets
def test_mask_ratio_is_exact_and_only_masked_pixels_are_zeroed():
    for n, ratio, want in ((64, 0.75, 48), (16, 0.75, 12), (16, 0.01, 1), (16, 0.999, 15)):
        assert num_masked(n, ratio) == want
        assert int(random_patch_mask(n, ratio).sum()) == want
    with pytest.raises(ValueError, match="mask_ratio=1.0"):
        num_masked(16, 1.0)
    image = torch.rand(3, 32, 32) + 0.5  # no zeros of its own
    mask = random_patch_mask(16, 0.75)
    masked = mask_image(image, mask, 8)
    got = patchify(masked, 8)
    assert bool((got[mask] == 0).all()) and torch.equal(got[~mask], patchify(image, 8)[~mask])


def test_patchify_order_and_normalised_targets_by_hand():
    image = torch.randn(3, 16, 24)
    patches = patchify(image, 8)
    assert patches.shape == (6, 8 * 8 * 3)
    # Patch 4 is grid row 1, column 1; values in (row, column, channel) order.
    assert torch.equal(patches[4], image[:, 8:16, 8:16].permute(1, 2, 0).reshape(-1))
    assert torch.equal(unpatchify(patches, 8, (2, 3)), image)
    values = patches[4].tolist()
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / len(values)
    want = torch.tensor([(v - mean) / (var + 1e-6) ** 0.5 for v in values])
    assert torch.allclose(normalised_patches(patches)[4], want, atol=1e-5)


@pytest.mark.parametrize("encoder", ["visible", "full"])
def test_the_model_never_sees_masked_pixels_and_the_loss_sees_only_masked_patches(encoder):
    torch.manual_seed(0)
    model = _tiny_mim_model(encoder).eval()
    spec = model.spec("pretrain")
    a = torch.rand(2, 3, 32, 32)
    masks = [random_patch_mask(16, 0.75) for _ in range(2)]
    b = a.clone()  # differs from a only inside masked patches
    for i, m in enumerate(masks):
        keep = (~m).reshape(4, 4).repeat_interleave(8, 0).repeat_interleave(8, 1)
        b[i] = torch.where(keep, a[i], torch.rand(3, 32, 32))
    targets = [{"mask": m, "patches": normalised_patches(patchify(x, 8))} for m, x in zip(masks, a)]
    run = lambda imgs: model(torch.stack([mask_image(x, m, 8) for x, m in zip(imgs, masks)]), "pretrain",
                             targets=targets)
    out_a, out_b = run(a), run(b)
    assert torch.equal(out_a["pred_BNmP"], out_b["pred_BNmP"])
    c = a.clone()
    visible = int((~masks[0]).nonzero()[0])
    c[0, :, (visible // 4) * 8, (visible % 4) * 8] += 1.0  # one visible pixel: the output must move
    assert not torch.equal(run(c)["pred_BNmP"], out_a["pred_BNmP"])
    # The loss is the MSE over the masked patches' targets only.
    loss = spec.loss(out_a, targets)["loss"]
    want = torch.cat([((out_a["pred_BNmP"][i] - t["patches"][t["mask"]]) ** 2).reshape(-1)
                      for i, t in enumerate(targets)]).mean()
    assert torch.allclose(loss, want)
    moved = [{**t, "patches": t["patches"].clone()} for t in targets]
    moved[0]["patches"][~masks[0]] += 5.0
    assert torch.equal(spec.loss(out_a, moved)["loss"], loss)
    moved[0]["patches"][masks[0]] += 5.0
    assert spec.loss(out_a, moved)["loss"] > loss


def test_visible_only_encoding_runs_the_blocks_on_the_visible_patches_alone():
    torch.manual_seed(0)
    model = _tiny_mim_model("visible").eval()
    images = torch.rand(2, 3, 32, 32)
    masks = [random_patch_mask(16, 0.75) for _ in range(2)]
    targets = [{"mask": m, "patches": normalised_patches(patchify(x, 8))} for m, x in zip(masks, images)]
    seen = []
    model.backbone.blocks[0].register_forward_hook(lambda mod, args, out: seen.append(args[0].clone()))
    maps = []
    model.pixel_decoder.register_forward_hook(lambda mod, args, out: maps.append(args[0]))
    model(torch.stack([mask_image(x, m, 8) for x, m in zip(images, masks)]), "pretrain", targets=targets)
    assert seen[0].shape == (2, 1 + 4, model.backbone.embed_dim)  # [CLS] + the 4 visible of 16 patches
    # The blocks' tokens are the visible patches' embeddings (in grid order), nothing else.
    tokens, _ = model.backbone._embed(torch.stack([mask_image(x, m, 8) for x, m in zip(images, masks)]))
    tokens = tokens + model.backbone.task_embed["pretrain"]
    for i, m in enumerate(masks):
        assert torch.allclose(seen[0][i, 1:], tokens[i, 1:][~m])
    # The maps handed to the pixel decoder hold zeros at masked positions (the stride-8 level).
    level = maps[0][1].flatten(2).transpose(1, 2)  # [B, 16, D]
    for i, m in enumerate(masks):
        assert bool((level[i][m] == 0).all()) and bool((level[i][~m] != 0).any(-1).all())
    with pytest.raises(ValueError, match="tasks.pretrain.encoder='sparse'"):
        _tiny_mim_model("sparse")


@pytest.mark.filterwarnings("ignore:skipping unreadable image")  # asserted where it matters
def test_unlabelled_images_skip_corrupt_files_refuse_empty_folders_and_fix_held_out_masks(tmp_path):
    from PIL import Image
    from moe_vision.data import build_transforms
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (40, 40), (i * 60, 10, 10)).save(tmp_path / "a" / "deep" / f"{i}.png")
    (tmp_path / "a" / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "a" / "notes.txt").write_text("ignored")
    paths = images_under(tmp_path / "a")
    assert len(paths) == 4  # recursive, images only
    ds = UnlabelledImages(paths, build_transforms("mim", False, 32), 8, 0.75)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [ds[i] for i in range(len(ds))]
    assert ds.skipped == 1 and any("broken.jpg" in str(w.message) for w in caught)
    assert all(x.shape == (3, 32, 32) and int(t["mask"].sum()) == 12 for x, t in items)
    # Training masks are fresh draws; a held-out split asks the same questions at every evaluation.
    train_masks = [[ds[i][1]["mask"] for i in range(len(ds))] for _ in range(2)]
    assert any(not torch.equal(a, b) for a, b in zip(*train_masks))
    held = UnlabelledImages(paths, build_transforms("mim", False, 32), 8, 0.75, held_out=True)
    first = [held[i][1]["mask"] for i in range(len(held))]
    torch.manual_seed(123)
    assert all(torch.equal(a, held[i][1]["mask"]) for i, a in enumerate(first))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images"):
        images_under(tmp_path / "empty")


# ------------------------------------------------------------------ tools
def test_pretrain_then_finetune_from_it(synthetic_root, tmp_path):
    run = tmp_path / "pre"
    r = _pretrain(synthetic_root, run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "reconstructions.png").stat().st_size > 1000
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 < metrics["pretrain"]["mse"] < 10 and "mse" in r.stdout
    # A killed run resumes from its step-2 checkpoint and continues identically.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "step_0000002", resumed / "checkpoints" / "step_0000002")
    (resumed / "checkpoints" / "latest").write_text("step_0000002")
    r = _pretrain(synthetic_root, resumed, "resume=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _losses(resumed) == {s: v for s, v in _losses(run).items() if s > 2}

    # init_from copies the encoder, decoder and queries; heads are new; MIM-only tensors ignored.
    from moe_vision.engine.builders import build_generalist
    from moe_vision.models import load_model
    from safetensors.torch import load_file
    cfg = {"model": {"name": "moe_vit_nano_patch8", "img_size": 32, "moe": {"num_experts": 4, "mlp_blocks": "all"}},
           "tasks": {"cls": {"type": "cls", "num_classes": 13}, "seg": {"type": "seg", "num_classes": 6}},
           "decoder": {"dim": 32, "num_queries": 14, "num_layers": 1, "num_heads": 2}}
    model = build_generalist(cfg)
    rep = init_from_pretrained(model, run, init_routers_from="pretrain")
    src = load_file(str(run / "model.safetensors"))
    assert all(n.startswith("heads.") for n in rep["new"]) and len(rep["new"]) == 4
    assert set(rep["ignored"]) == {k for k in src if "pretrain" in k}
    state = model.state_dict()
    assert all(torch.equal(state[k], src[k]) for k in rep["loaded"])
    assert "decoder.query_embed" in rep["loaded"] and "backbone.blocks.0.attn.qkv.weight" in rep["loaded"]
    assert torch.equal(state["backbone.blocks.1.mlp.router.gates.seg.weight"],
                       src["backbone.blocks.1.mlp.router.gates.pretrain.weight"])
    encoder_only = init_from_pretrained(build_generalist(cfg), run, init_routers_from="pretrain", keep="encoder")
    assert encoder_only["loaded"] and all(n.startswith("backbone.") for n in encoder_only["loaded"])
    assert "decoder.query_embed" in encoder_only["new"] and "pixel_decoder.level_embed" in encoder_only["new"]
    counts = set_trainable(model, "head")
    assert counts["trainable"] == sum(p.numel() for n, p in model.named_parameters() if n.startswith("heads."))

    # The training tool fine-tunes head-only from it; frozen tensors stay the pre-trained ones.
    ft = tmp_path / "ft"
    r = _tool("train.py", "experiment=synthetic", *SMALL, f"data.root={synthetic_root}", f"output_dir={ft}",
              "tasks.cls.batch_size=4", "tasks.det.batch_size=4", "tasks.seg.batch_size=4", "train.steps=2",
              f"model.init_from={run}", "model.init_routers_from=pretrain", "train.trainable=head",
              "train.head_lr_mult=5", "train.expert_budget.experts=null")  # (routers frozen: nothing to narrow)
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(n.startswith("heads.") for n in json.loads((ft / "init_from.json").read_text())["new"])
    tuned = load_model(ft / "model.safetensors").state_dict()
    for name in ("decoder.query_embed", "backbone.blocks.1.mlp.experts.w1", "pixel_decoder.output.0.weight"):
        assert torch.equal(tuned[name], src[name]), name  # frozen: still the pre-trained tensor
    # A bundle extracted from the fine-tuned model is still lossless.
    r = _tool("extract_experts.py", "--task", "seg", "--checkpoint", str(ft), "--out", str(tmp_path / "seg"),
              "--data-root", str(synthetic_root), "--latency-calls", "4")
    assert r.returncode == 0 and "bit-identical" in r.stdout, r.stderr[-2000:]


def test_pretraining_bad_input(synthetic_root, tmp_path):
    r = _tool("pretrain.py", "experiment=synthetic", *SMALL, f"data.root={synthetic_root}",
              f"output_dir={tmp_path / 'x'}")
    assert r.returncode != 0 and "pass experiment=pretrain_glid" in r.stderr
    (tmp_path / "nothing").mkdir()
    r = _pretrain(synthetic_root, tmp_path / "y", "data.tasks.pretrain.format=images",
                  f"+data.tasks.pretrain.root={tmp_path / 'nothing'}")
    assert r.returncode != 0 and "holds no images" in r.stderr
    r = _pretrain(synthetic_root, tmp_path / "z", "tasks.pretrain.patch_size=16")
    assert r.returncode != 0 and "tasks.pretrain.patch_size=16 but the backbone's patch size is 8" in r.stderr
    # init_from a model of another size names the tensor and both shapes.
    model = _tiny_mim_model()
    from moe_vision.models import save_model
    save_model(model, tmp_path / "small.safetensors")
    from moe_vision.engine.builders import build_generalist
    other = build_generalist({"model": {"name": "moe_vit_nano_patch8", "img_size": 32, "moe": {"num_experts": 4}},
                              "tasks": {"cls": {"type": "cls", "num_classes": 3}},
                              "decoder": {"dim": 64, "num_queries": 4, "num_layers": 1, "num_heads": 2}})
    with pytest.raises(ValueError, match=r"tensor \S+ has shape \(\d+, 32\) there but \(\d+, 64\) in this model"):
        init_from_pretrained(other, tmp_path / "small.safetensors")
    with pytest.raises(ValueError, match="train.trainable='encoder'"):
        set_trainable(other, "encoder")


# ------------------------------------------------------------------ hybrid objective
SEG_NAMES = ["background"] + [f"digit_{i}" for i in range(10)] + ["circle", "square", "triangle"]


def _sources(root: Path) -> dict:
    from moe_vision.data import ADE20KDataset, CocoDetectionDataset, DepthDataset, ImageFolderDataset
    return {"cls": ImageFolderDataset(root / "cls", "train"),
            "det": CocoDetectionDataset(root / "det" / "annotations" / "instances_train.json", root / "det" / "train"),
            "seg": ADE20KDataset(root / "seg", "train", reduce_zero_label=False),
            "depth": DepthDataset(root / "depth", "train")}


def test_multilabel_targets_from_each_format(synthetic_root):
    from moe_vision.pretrain import LabelSpace
    sources = _sources(synthetic_root)
    with pytest.raises(ValueError, match="class_names.seg"):
        LabelSpace(sources)
    space = LabelSpace(sources, {"seg": SEG_NAMES})
    assert space.names[:13] == sources["cls"].classes and len(space) == 14  # same names share a column
    det = sources["det"]
    k = next(i for i in range(len(det)) if len(set(det.targets[i][j][4] for j in range(len(det.targets[i])))) == 2)
    present, known = space.target("det", det, det[k][1])
    names = {det.classes[int(row[4])] for row in det.targets[k]}
    assert {space.names[i] for i in present.nonzero()[:, 0].tolist()} == names and int(present.sum()) == 2
    assert int(known.sum()) == 13 and not bool(known[space.names.index("background")])  # det's own columns only
    present, known = space.target("cls", sources["cls"], sources["cls"][0][1])
    assert int(known.sum()) == 1 and int(present.sum()) == 1  # a single label says nothing about the rest
    assert space.names[int(present.argmax())] == sources["cls"].classes[int(sources["cls"][0][1]["label"])]
    seg_target = sources["seg"][0][1]
    present, known = space.target("seg", sources["seg"], seg_target)
    in_map = {SEG_NAMES[int(v)] for v in torch.as_tensor(seg_target["mask"]).unique()}
    assert {space.names[i] for i in present.nonzero()[:, 0].tolist()} == in_map and int(known.sum()) == 14
    present, known = space.target("depth", sources["depth"], sources["depth"][0][1])
    assert not bool(known.any())


def test_hybrid_held_out_masks_are_fixed(synthetic_root):
    from moe_vision.data import build_transforms
    from moe_vision.pretrain import TwoViewImages
    views = build_transforms("mim", True, 32, scale=(0.5, 1.0))
    held = TwoViewImages(_sources(synthetic_root), views, 8, 0.75, {"seg": SEG_NAMES}, held_out=True)
    a, b = held[3][1]["mask"], held[3][1]["mask"]
    assert a.shape == (2, 16) and torch.equal(a, b) and not torch.equal(a[0], a[1])  # two views, two masks


def test_contrastive_and_masked_multilabel_losses_by_hand():
    import math
    from moe_vision.pretrain import info_nce, masked_bce
    z1, z2 = torch.randn(4, 3), torch.randn(4, 3)
    n1 = [v / v.norm() for v in z1]
    n2 = [v / v.norm() for v in z2]
    t = 0.3

    def ce(rows, i):
        logits = [float(rows[i] @ other) / t for other in rows_other]
        return -logits[i] + math.log(sum(math.exp(v) for v in logits))
    rows_other = n2
    a = sum(ce(n1, i) for i in range(4)) / 4
    rows_other = n1
    b = sum(ce(n2, i) for i in range(4)) / 4
    assert float(info_nce(z1, z2, t)) == pytest.approx(0.5 * (a + b), rel=1e-5)
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    present, known = torch.tensor([[1.0, 0.0, 1.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    want = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.0))) / 2  # the third column is unknown
    assert float(masked_bce(logits, present, known)) == pytest.approx(want, rel=1e-6)
    present[0, 2] = 0.0  # an unannotated column may hold anything
    assert float(masked_bce(logits, present, known)) == pytest.approx(want, rel=1e-6)


def test_hybrid_pretraining_runs_and_its_terms_switch_off(synthetic_root, tmp_path):
    out = tmp_path / "hy"
    r = _tool("pretrain.py", "experiment=pretrain_hybrid", *SMALL, f"data.root={synthetic_root}", f"output_dir={out}",
              "tasks.pretrain.batch_size=4", "train.steps=2", "train.eval_every=0",
              "tasks.pretrain.loss_weights.contrastive=0")
    assert r.returncode == 0, r.stderr[-3000:]
    logged = json.loads((out / "train_log.jsonl").read_text().splitlines()[-1])["task_losses"]["pretrain"]
    assert {"mim", "multilabel"} <= set(logged) and "contrastive" not in logged
    metrics = json.loads((out / "metrics.json").read_text())["pretrain"]
    assert {"mse", "ml_acc", "retrieval_top1"} <= set(metrics) and (out / "reconstructions.png").is_file()
    # Data without labels cannot feed the multi-label term: a clear message.
    (tmp_path / "imgs").mkdir()
    from PIL import Image
    for i in range(4):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(tmp_path / "imgs" / f"{i}.png")
    r = _tool("pretrain.py", "experiment=pretrain_hybrid", *SMALL, f"data.root={synthetic_root}",
              f"output_dir={tmp_path / 'nolabels'}", "data.tasks.pretrain.format=images",
              f"+data.tasks.pretrain.root={tmp_path / 'imgs'}")
    assert r.returncode != 0 and "set tasks.pretrain.loss_weights.multilabel=0" in r.stderr
