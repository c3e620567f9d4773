"""Per-task expert subsets: the router's mask, the budget schedule (train.expert_budget), training
with it (resume, no host reads, add_task), and extraction that reads it (the default, exact and
compact), the notice for spread routing and the subset search for models trained without one."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from moe_vision.engine.expert_budget import ExpertBudget
from moe_vision.engine.steplog import StepLog
from moe_vision.engine.trainer import Trainer
from moe_vision.models import load_model
from moe_vision.moe import MoEMLP
from moe_vision.surgery.continual import add_task, bit_identical, outputs_on_probe
from moe_vision.surgery.pipeline import extract_bundle
from tests.test_engine import make_cfg

BUDGET = ["train.steps=8", "train.expert_budget.experts=2", "train.expert_budget.start=0.25",
          "train.expert_budget.end=0.75", "train.expert_budget.every=4", "eval.periodic_images=0"]
# (4 experts per layer: the one narrowing, at step 6, drops 2 of them by the scores of steps 3-6)


def _masks(model) -> dict:
    return {(name, t): m.router.allowed_mask(t).clone() for name, m in model.backbone.named_modules()
            if hasattr(m, "router") and name in model.backbone.moe_layers() for t in m.router.tasks}


def test_a_masked_expert_is_never_chosen_and_a_full_mask_changes_nothing():
    torch.manual_seed(0)
    layer = MoEMLP(16, 8, ["a", "b"], num_experts=6, top_k=2)
    for gate in layer.router.gates.values():
        torch.nn.init.normal_(gate.weight, std=1.0)
    x = torch.randn(64, 16)
    ya, yb = layer(x, "a")[0], layer(x, "b")[0]
    layer.router.set_allowed("a", torch.ones(6, dtype=torch.bool))
    assert torch.equal(layer(x, "a")[0], ya)
    layer.router.set_allowed("a", torch.tensor([False, True, False, True, True, False]))
    y, r = layer(x, "a")
    assert set(r.idx_TK.unique().tolist()) <= {1, 3, 4} and not torch.equal(y, ya)
    probs = torch.softmax(layer.router.gates["a"](x).float(), -1)
    assert float(r.prob_sum_E.detach()[[0, 2, 5]].abs().max()) == 0 and probs[:, [0, 2, 5]].min() > 0  # masked, not small
    assert torch.equal(layer(x, "b")[0], yb)  # other tasks route as before
    with pytest.raises(ValueError, match=r"needs shape \(6,\)"):
        layer.router.set_allowed("a", torch.ones(5, dtype=torch.bool))
    # Saved with the layer; a state dict written before the masks existed (router version 1) allows
    # every expert; one written since that lacks them is refused by a strict load.
    again = MoEMLP(16, 8, ["a", "b"], num_experts=6, top_k=2)
    again.load_state_dict(layer.state_dict())
    assert torch.equal(again.router.allowed_mask("a"), layer.router.allowed_mask("a"))
    state = layer.state_dict()
    old = type(state)((k, v) for k, v in state.items() if ".allowed." not in k)
    old._metadata = {k: dict(v) for k, v in state._metadata.items()}
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*router.allowed.a"):
        again.load_state_dict(old)
    old._metadata["router"]["version"] = 1
    again.load_state_dict(old)
    assert bool(again.router.allowed_mask("a").all())


def _routing(layer: str, task: str, weights: dict[int, float]):
    idx = torch.tensor([[e] for e in weights])
    w = torch.tensor([[v] for v in weights.values()])
    return SimpleNamespace(layer=layer, task=task, gate_sums=lambda n: torch.zeros(n).index_add_(0, idx[:, 0], w[:, 0]))


def _cfg(**options) -> dict:
    """A whole ``train.expert_budget`` (every key, as configs/train.yaml gives it) with ``options``."""
    return {"experts": None, "tasks": {}, "start": 0.1, "end": 0.5, "every": 25, **options}


def _layer(tasks=("a", "b"), experts=8, **kw):
    return MoEMLP(16, 8, list(tasks), num_experts=experts, top_k=2, layer_name="blocks.0.mlp", **kw)


def test_the_schedule_narrows_from_every_expert_to_the_budget_by_the_scores():
    layer = _layer()
    budget = ExpertBudget({"blocks.0.mlp": layer}, _cfg(experts=2, start=0.2, end=0.6, every=10, tasks={"b": 3}),
                          steps=100)
    keep = [budget.keep_at(s, 8, 2) for s in range(101)]
    assert keep[:21] == [8] * 21 and keep[60:] == [2] * 41 and keep == sorted(keep, reverse=True)
    assert [s for s in range(61) if budget.narrowing(s)] == [30, 40, 50, 60]
    expected = 8
    for step in range(1, 101):  # expert 6 is a's favourite, then 2; b prefers 7, 0, 1
        budget.after_step(step, [_routing("blocks.0.mlp", "a", {6: 0.7, 2: 0.3, step % 8: 0.01}),
                                 _routing("blocks.0.mlp", "b", {7: 0.5, 0: 0.3, 1: 0.2})])
        expected = keep[step] if budget.narrowing(step) else expected
        assert int(layer.router.allowed_mask("a").sum()) == expected, step
    assert layer.router.allowed_mask("a").nonzero().flatten().tolist() == [2, 6]
    assert layer.router.allowed_mask("b").nonzero().flatten().tolist() == [0, 1, 7]
    assert budget.unfinished() == {} and not budget.narrowing(70)  # done: no more narrowings
    assert budget.describe() == ("expert budget: experts kept per MoE layer a 2, b 3 (1 layers), narrowed every 10 "
                                 "steps from step 20 to 60")


def test_a_task_with_no_tokens_in_a_window_is_not_narrowed_by_index():
    layer = _layer()
    budget = ExpertBudget({"blocks.0.mlp": layer}, _cfg(experts=2, start=0.0, end=0.4, every=10), steps=100)
    b_likes = {7: 0.6, 6: 0.4}
    for step in range(1, 101):  # b gets tokens only in steps 25-29 and after 60
        seen = 25 <= step < 30 or step > 60
        budget.after_step(step, [_routing("blocks.0.mlp", "a", {1: 0.5, 3: 0.5}),
                                 *([_routing("blocks.0.mlp", "b", b_likes)] if seen else [])])
        if step == 10:  # no token of b yet: its mask stays whole (before: experts 0-5 kept by index)
            assert bool(layer.router.allowed_mask("b").all())
    assert layer.router.allowed_mask("b").nonzero().flatten().tolist() == [6, 7]
    assert layer.router.allowed_mask("a").nonzero().flatten().tolist() == [1, 3]
    # A task that never gets a token after the window is named, not narrowed by index.
    late = _layer()
    budget = ExpertBudget({"blocks.0.mlp": late}, _cfg(experts=2, start=0.0, end=0.4, every=10), steps=100)
    for step in range(1, 101):
        budget.after_step(step, [_routing("blocks.0.mlp", "a", {1: 0.5, 3: 0.5})])
    assert budget.unfinished() == {"b": ["blocks.0.mlp"]} and bool(late.router.allowed_mask("b").all())


def test_a_budget_that_cannot_narrow_is_refused_with_one_line():
    layers = {"blocks.0.mlp": _layer()}
    refused = [
        (_cfg(experts=1), "keeps 1 experts in blocks.0.mlp; expected top_k=2"),
        ({"expert": 2}, r"unknown option\(s\) \['expert'\]; missing option\(s\)"),
        (_cfg(experts=2, start=0.5, end=0.5), "start=0.5 and end=0.5 of train.steps=100 give steps 50 and 50: no step"),
        (_cfg(experts=2, start=0.101, end=0.109), "give steps 10 and 10: no step narrows"),
        (_cfg(experts=2, tasks={"dett": 4}), r"names \['dett'\], which this model does not have; its tasks are"),
        (_cfg(experts=2.5), "keeps 2.5 experts; expected a whole number"),
    ]
    for cfg, message in refused:
        with pytest.raises(ValueError, match=message):
            ExpertBudget(layers, cfg, steps=100)
    with pytest.raises(ValueError, match="needs dropless routing, but model.moe.capacity_factor=1.25"):
        ExpertBudget({"blocks.0.mlp": _layer(capacity_factor=1.25)}, _cfg(experts=2), steps=100)
    ExpertBudget({"blocks.0.mlp": _layer(capacity_factor=1.25)}, _cfg(), steps=100)  # no budget: fine
    frozen = _layer()
    frozen.router.gates["a"].weight.requires_grad_(False)  # a frozen task is never narrowed, and said so
    budget = ExpertBudget({"blocks.0.mlp": frozen}, _cfg(experts=2), steps=100)
    assert ("blocks.0.mlp", "a") not in budget.targets and "frozen, not narrowed: a" in budget.describe()
    with pytest.raises(ValueError, match="tasks.a=2: a's router is frozen"):
        ExpertBudget({"blocks.0.mlp": frozen}, _cfg(tasks={"a": 2}), steps=100)
    frozen.router.gates["b"].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="every task's router is frozen"):
        ExpertBudget({"blocks.0.mlp": frozen}, _cfg(experts=2), steps=100)


@pytest.fixture(scope="module")
def budget_run(synthetic_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("budget") / "run"
    Trainer(make_cfg(synthetic_root, run, *BUDGET)).fit()
    return run


def test_training_with_a_budget_gives_the_default_bundle_its_experts_exactly(budget_run, tmp_path):
    model = load_model(budget_run / "model.safetensors")
    masks = _masks(model)
    assert masks and all(int(m.sum()) == 2 for m in masks.values())
    usage = json.loads((budget_run / "expert_usage.json").read_text())
    assert {(layer, t): e for layer, per in usage["allowed"].items() for t, e in per.items()} == \
        {k: m.nonzero().flatten().tolist() for k, m in masks.items()}  # what the heatmap frames
    for li, layer in enumerate(usage["layers"]):
        for ti, task in enumerate(usage["tasks"]):
            used = {e for e, c in enumerate(usage["counts"][li][ti]) if c > 0}
            assert used <= set(masks[(layer, task)].nonzero().flatten().tolist()), (layer, task)
    info = extract_bundle(budget_run, "det", tmp_path / "det", latency_calls=4, log=lambda m: None)  # the default rule
    assert info["rule"]["name"] == "allowed" and info["lossless_check"]["identical"] is True
    assert all(len(kept) == 2 for kept in info["kept_experts"].values())
    assert info["params"]["bundle"] < info["params"]["full"]
    assert set(info["overlap"][next(iter(info["overlap"]))]) == {"cls", "seg"}
    both = extract_bundle(budget_run, "det,seg", tmp_path / "det-seg", latency_calls=4, log=lambda m: None)
    assert both["lossless_check"]["identical"] is True


def test_a_top1_bundle_computes_less_and_says_it_is_not_exact(budget_run, tmp_path):
    from moe_vision.surgery.bundle import load_bundle
    info = extract_bundle(budget_run, "det", tmp_path / "det1", top_k=1, latency_calls=4, max_batches=1,
                          log=lambda m: None)
    assert info["top_k"] == {"parent": 2, "bundle": 1} and info["lossless_check"] is None
    assert info["flops_per_image"]["bundle"]["det"] < 0.97 * info["flops_per_image"]["full"]["det"]
    model = load_bundle(tmp_path / "det1")
    assert {m.top_k for m in model.backbone.moe_modules().values()} == {1}
    for bad, msg in ((3, r"--top-k 3: expected 1 to the model's own top_k \(2\)"), (0, "--top-k 0")):
        with pytest.raises(ValueError, match=msg):
            extract_bundle(budget_run, "det", tmp_path / "bad", top_k=bad, log=lambda m: None)
    with pytest.raises(ValueError, match="a --dense specialist has no router"):
        extract_bundle(budget_run, "det", tmp_path / "bad", top_k=1, dense=True, log=lambda m: None)
    assert not (tmp_path / "bad").exists()


def test_a_budget_run_resumes_exactly_between_two_narrowings(budget_run, synthetic_root, tmp_path):
    part_cfg = make_cfg(synthetic_root, tmp_path / "part", *BUDGET, "train.ckpt_every=4")
    first = Trainer(part_cfg)
    steps = StepLog(first.dist)
    for _ in range(4):  # the narrowing is at step 6: step 4 holds the scores of steps 3 and 4
        steps.add(first.train_step())
    saved = first.budget.state_dict()
    assert saved["scores"] and all(sum(v) > 0 for v in saved["scores"].values())
    (tmp_path / "part").mkdir(exist_ok=True)
    with open(tmp_path / "part" / "train_log.jsonl", "a") as f:
        f.writelines(json.dumps(rec) + "\n" for rec in steps.flush())
    first.save()
    probe = Trainer({**part_cfg, "resume": True})
    assert probe.resume() and probe.budget.state_dict() == saved  # the scores come back as they were
    resumed = Trainer({**part_cfg, "resume": True})
    resumed.fit()
    losses = lambda run: [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert losses(tmp_path / "part") == losses(budget_run)  # the uninterrupted run
    want, got = _masks(load_model(budget_run / "model.safetensors")), _masks(resumed.model)
    assert all(torch.equal(want[k], got[k]) for k in want)
    # Without the saved scores the narrowing would see steps 5-6 only and pick other experts.
    fresh = Trainer(make_cfg(synthetic_root, tmp_path / "fresh", *BUDGET))
    for _ in range(4):
        fresh.train_step()
    fresh.budget.scores.zero_()
    for _ in range(2):
        fresh.train_step()
    assert any(not torch.equal(want[k], m) for k, m in _masks(fresh.model).items())


def test_budget_steps_read_nothing_on_the_host(synthetic_root, tmp_path):
    from tests.test_host_reads import HOST_DATA, HostReads
    trainer = Trainer(make_cfg(synthetic_root, tmp_path / "run", *BUDGET, "train.expert_budget.every=1",
                               "train.log_every=8", "model.moe.kernel=grouped_mm", "tasks.det.matcher=device"))
    steps = StepLog(trainer.dist)
    steps.add(trainer.train_step())
    with HostReads() as reads:
        for _ in range(6):  # steps 2-7: scores every step, a narrowing at each of 3-6
            steps.add(trainer.train_step())
    # One read in the whole run: at the end of the narrowing phase, which tasks are still above budget.
    assert reads.outside(HOST_DATA) == {("tolist", "expert_budget.py", "after_step"): 1}
    assert all(int(m.sum()) == 2 for m in _masks(trainer.model).values())


def test_a_task_added_later_gets_its_budget_over_old_and_new_experts(budget_run, synthetic_root, tmp_path):
    from moe_vision.engine.builders import load_generalist
    full, _, run_cfg = load_generalist(budget_run)
    x = torch.randn(2, 3, 32, 32)
    before, old_masks = outputs_on_probe(full, full.tasks, x), _masks(full)
    grown = add_task(full, "depth", {"type": "depth"}, new_experts=2)
    cfg = make_cfg(synthetic_root, tmp_path / "grown", *BUDGET, "+task@tasks.depth=depth", "tasks.depth.batch_size=4",
                   "train.sampling.tasks_per_step=1")
    cfg["tasks"] = {"depth": cfg["tasks"]["depth"]}
    Trainer(cfg, model=grown).fit()
    masks = _masks(grown)
    assert all(torch.equal(masks[k], old_masks[k]) for k in old_masks)  # frozen tasks keep theirs
    new = [m for (layer, task), m in masks.items() if task == "depth"]
    assert new and all(m.numel() == 6 and int(m.sum()) == 2 for m in new)  # 4 old + 2 new experts, budget 2
    assert bit_identical(before, outputs_on_probe(grown, full.tasks, x))


def test_the_spread_notice_names_exact_bundles_that_keep_most_experts(tiny_run, tmp_path):
    from moe_vision.surgery.pipeline import spread_notice
    layers = {"blocks.1.mlp": 8, "blocks.3.mlp": 8}
    five = {"blocks.1.mlp": [0, 1, 2, 3, 4], "blocks.3.mlp": [1, 2, 3, 4, 5]}  # 10 of 16: 62.5%
    half = {"blocks.1.mlp": [0, 1, 2, 3], "blocks.3.mlp": [1, 2, 3, 4, 5]}  # 9 of 16: 56%
    assert spread_notice("det", "selected", five, layers).startswith("note: 'det' uses 5/8, 5/8 experts per MoE layer")
    assert spread_notice("det", "selected", half, layers) is None
    assert "'det' may choose 5/8, 5/8 experts per MoE layer (its router was not narrowed in training)" in \
        spread_notice("det", "allowed", five, layers)
    assert spread_notice("det", "top_n", five, layers) is None  # not exact: it says so in its own way
    said = []  # rule allowed on a model trained without a budget: every expert, and a line that says so
    info = extract_bundle(tiny_run / "run", "det", tmp_path / "det", rule="allowed", latency_calls=4, log=said.append)
    assert info["params"]["bundle"] == info["params"]["full"] - sum(
        p.numel() for n, p in load_model(tiny_run / "run" / "model.safetensors").named_parameters()
        if not n.startswith(("heads.det.", "backbone.")) and n.startswith("heads.") or "router.gates.cls" in n
        or "router.gates.seg" in n or n.startswith("backbone.task_embed.") and not n.endswith(".det")
        or "dn_label_embed" in n)
    assert any(m.startswith("note: 'det' may choose 4/4") for m in said), said


def _batches(run, task, split="train", images=256):
    from moe_vision.engine.builders import build_dataset, load_generalist
    from moe_vision.engine.evaluate import fixed_subset, iterate_batches
    full, _, cfg = load_generalist(run)
    data = build_dataset(task, {**full.spec(task).config(), **cfg["tasks"][task]}, cfg["data"], split, False)
    return full.eval(), list(iterate_batches(fixed_subset(data, images), 64))


def _only(n: int, subset) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.bool).index_fill(0, torch.tensor(list(subset)), True)


def test_the_search_keeps_in_every_layer_in_forward_order_the_subset_that_moves_the_outputs_least(tiny_run, tmp_path):
    from itertools import combinations
    found = extract_bundle(tiny_run / "run", "cls", tmp_path / "search", rule="search", value=2, latency_calls=4, log=lambda m: None)
    assert all(len(k) == 2 for k in found["kept_experts"].values()) and found["lossless_check"] is None
    assert found["rule"] == {"name": "search", "value": 2, "per_task": {"cls": "search"}, "error": "output"}
    assert found["calibration_split"] == "train" and found["calibration_images"] == {"cls": 26}
    full, batches = _batches(tiny_run / "run", "cls")
    floats = lambda out: {k: v for k, v in out.items() if torch.is_tensor(v) and v.is_floating_point()}
    with torch.no_grad():
        want = [floats(full(images, "cls", targets=targets)) for images, targets in batches]
        for layer, module in full.backbone.moe_modules().items():  # earlier layers already cut to their choice
            errors = {}
            for subset in combinations(range(module.num_experts), 2):
                module.router.set_allowed("cls", _only(module.num_experts, subset))
                got = [floats(full(images, "cls", targets=targets)) for images, targets in batches]
                errors[subset] = sum(sum(float((g[k] - w[k]).square().sum()) for g, w in zip(got, want))
                                     / sum(float(w[k].square().sum()) for w in want) for k in want[0])
            best = min(errors, key=errors.get)
            assert tuple(found["kept_experts"][layer]) == best, (layer, errors)
            module.router.set_allowed("cls", _only(module.num_experts, best))


def test_the_layer_search_works_on_moe_attention_and_picks_the_least_layer_error():
    from itertools import combinations
    from moe_vision.engine.builders import build_generalist
    from moe_vision.surgery.select import search_subsets
    model = build_generalist({"model": {"name": "moe_vit_nano_patch8", "img_size": 32,
                                        "moe": {"num_experts": 4, "attn_blocks": "every_2", "attn_num_experts": 4,
                                                "attn_top_k": 1}},
                              "tasks": {"cls": {"type": "cls", "num_classes": 5}},
                              "decoder": {"dim": 32, "num_queries": 6, "num_layers": 1, "num_heads": 2}}).eval()
    batches = [(torch.randn(3, 3, 32, 32), None), (torch.randn(2, 3, 32, 32), None)]
    layers = model.backbone.moe_modules()
    first = next(iter(layers))
    assert first.endswith(".attn")
    kept = search_subsets(model, "cls", batches, 2, log=lambda m: None, error="layer")  # (crashed on attention)
    assert set(kept) == set(layers) and all(len(k) == 2 for k in kept.values())
    module, outputs = layers[first], []
    hook = module.register_forward_hook(lambda m, args, out: outputs.append(out[0]))
    errors = {}
    with torch.no_grad():
        for subset in [None, *combinations(range(4), 2)]:
            outputs.clear()
            if subset is not None:
                module.router.set_allowed("cls", _only(4, subset))
            for images, _ in batches:
                model(images, "cls")
            if subset is None:
                want = list(outputs)
            else:
                errors[subset] = sum(float((o - w).square().sum()) for o, w in zip(outputs, want))
    hook.remove()
    assert tuple(kept[first]) == min(errors, key=errors.get)


def test_a_multi_task_bundle_with_a_lossy_rule_routes_each_task_among_its_own_experts(tiny_run, tmp_path):
    import copy
    from moe_vision.surgery.bundle import load_bundle
    info = extract_bundle(tiny_run / "run", "det,seg", tmp_path / "both", rule="search", value=2, latency_calls=4, log=lambda m: None)
    bundle = load_bundle(tmp_path / "both")
    for task in ("det", "seg"):
        full, batches = _batches(tiny_run / "run", task, "val")
        probe = copy.deepcopy(full)  # the full model with the task narrowed to what the search chose for it
        for layer, module in probe.backbone.moe_modules().items():
            module.router.set_allowed(task, _only(module.num_experts, info["kept_experts_per_task"][task][layer]))
        with torch.no_grad():
            for images, targets in batches:
                a, b = probe(images, task, targets=targets), bundle(images, task, targets=targets)
                assert all(torch.equal(v, b[k]) for k, v in a.items() if torch.is_tensor(v)), task


def test_detection_outputs_are_compared_as_sets_of_queries(tiny_run):
    from moe_vision.surgery.select import match_rows
    full, batches = _batches(tiny_run / "run", "det", "val")
    images, targets = batches[0]
    with torch.no_grad():
        ref = {k: v.float() for k, v in full(images, "det", targets=targets).items() if torch.is_tensor(v)
               and v.is_floating_point()}
    perm = torch.stack([torch.randperm(ref["logits"].shape[1]) for _ in range(ref["logits"].shape[0])])
    shuffled = {k: v.gather(1, perm.view(*perm.shape, *[1] * (v.dim() - 2)).expand_as(v)) if k in ("logits", "boxes")
                else v for k, v in ref.items()}
    assert not torch.equal(shuffled["boxes"], ref["boxes"])  # the same queries in another order ...
    matched = match_rows(shuffled, ref, full.spec("det").unordered_outputs)
    assert all(torch.equal(matched[k], ref[k]) for k in ref)  # ... compare equal


def test_a_checkpoint_saved_before_the_masks_existed_loads_with_every_expert_allowed(tiny_run, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(tiny_run / "run" / "model.safetensors"), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
        state = {k: f.get_tensor(k) for k in keys if ".router.allowed." not in k}
    assert len(state) < len(keys)
    save_file(state, str(tmp_path / "lost.safetensors"), metadata=meta)  # written since: masks expected
    with pytest.raises(ValueError, match=r"does not match the model: missing keys \['backbone.*router.allowed"):
        load_model(tmp_path / "lost.safetensors")
    del meta["router_masks"]  # a file written before the masks existed
    save_file(state, str(tmp_path / "old.safetensors"), metadata=meta)
    masks = _masks(load_model(tmp_path / "old.safetensors"))
    assert masks and all(bool(m.all()) for m in masks.values())


def test_a_step_skipped_for_a_non_finite_loss_adds_nothing_to_the_scores(synthetic_root, tmp_path):
    from tests.test_resilience import _nan_at
    trainer = Trainer(make_cfg(synthetic_root, tmp_path / "run", *BUDGET, "train.nonfinite=skip",
                               "train.sampling.tasks_per_step=3"))
    _nan_at(trainer, "det", {4})
    for _ in range(3):
        trainer.train_step()
    after_3 = trainer.budget.scores.clone()
    assert float(after_3.sum()) > 0  # step 3 scored (the window starts after step 2)
    trainer.train_step()  # step 4: det's loss is NaN, no update, and no scores
    assert trainer.nonfinite_skipped == {"det": 1} and torch.equal(trainer.budget.scores, after_3)
    trainer.train_step()
    assert not torch.equal(trainer.budget.scores, after_3)
