"""The extraction pipeline behind ``tools/extract_experts.py``: usage -> selection -> slicing (or
folding into a dense specialist) -> lossless check -> metrics, parameters, FLOPs and latency of
both models -> bundle folder with its model card (and an archive)."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from ..engine import report
from ..engine.builders import build_dataset, load_generalist
from ..engine.evaluate import chance_metrics, evaluate, fixed_subset, iterate_batches
from ..engine.optim import parameter_counts
from .. import exactness
from ..io_utils import sha256_of
from ..moe import ExpertUsage
from ..progress import progress_bar
from ..tasks import GeneralistModel
from .bundle import BUNDLE_FORMAT, write_archive, write_bundle
from .extract import extract_task, flops_per_image, route_among_own, union_of, with_top_k
from .select import RULES, allowed_experts, is_budgeted, search_subsets, select_layer


def relocate_data(data_cfg: dict, new_root: str) -> dict:
    """The run's data config with its ``root`` moved: every path under the old root follows."""
    old = str(data_cfg["root"])
    move = (lambda v: new_root + v[len(old):] if isinstance(v, str) and v.startswith(old) else v)
    return {**data_cfg, "root": new_root,
            "tasks": {t: {k: move(v) for k, v in d.items()} for t, d in data_cfg["tasks"].items()}}


@torch.no_grad()
def task_usage(model: GeneralistModel, task: str, dataset, batch_size: int = 64, max_batches: int | None = None,
               usage: ExpertUsage | None = None) -> ExpertUsage:
    """Selection counts of ``task``'s routers on ``dataset``, added to ``usage`` (a new one if None)."""
    usage = usage or ExpertUsage(model.backbone.moe_layers(), [task])
    model.eval()
    for images, targets in iterate_batches(dataset, batch_size, max_batches):
        usage.update(model(images, task, return_routing=True, targets=targets)[1])
    return usage


@torch.no_grad()
def outputs_identical(full: GeneralistModel, small: GeneralistModel, task: str, dataset, batch_size: int = 64,
                      max_batches: int | None = None) -> tuple[bool, float, int]:
    """Whether every output tensor of both models is bit-identical on ``dataset`` (batched, padded and
    masked as evaluation batches them); the max difference; and how many images were compared (a
    check over no image proves nothing: it raises)."""
    full.eval(), small.eval()
    same, worst, images_seen = True, 0.0, 0
    for images, targets in iterate_batches(dataset, batch_size, max_batches):
        a, b = full(images, task, targets=targets), small(images, task, targets=targets)
        images_seen += len(targets)
        for k, v in a.items():
            if isinstance(v, torch.Tensor):
                same &= torch.equal(v, b[k])
                worst = max(worst, float((v.float() - b[k].float()).abs().max()))
    if images_seen == 0:
        raise ValueError(f"the lossless check of '{task}' has no image to compare (empty split?)")
    return same, worst, images_seen


@torch.no_grad()
def median_call_ms(fn, x: torch.Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``fn(x)`` over ``repeats`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def alternating_latency_ms(models: dict, task: str, image_size: int, batch: int = 1, calls: int = 60,
                           warmup: int = 5) -> dict[str, dict[str, float]]:
    """Per model: median, first and third quartile of milliseconds per forward pass of ``batch``
    images, the models called in turn (one call each, ``calls`` rounds after ``warmup``), so that
    a slow spell of the machine falls on both alike."""
    x = torch.randn(batch, 3, image_size, image_size)
    for m in models.values():
        m.eval()
        for _ in range(warmup):
            m(x, task)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(calls):
        for name, m in models.items():
            t0 = time.perf_counter()
            m(x, task)
            times[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, t in times.items():
        q1, median, q3 = statistics.quantiles(t, n=4)
        out[name] = {"median": median, "q1": q1, "q3": q3}
    return out


def parse_tasks(task: str | list[str]) -> list[str]:
    """``"det"``, ``"det,seg"`` or a list -> task names (distinct, in order)."""
    tasks = [t.strip() for t in task.split(",")] if isinstance(task, str) else list(task)
    if not tasks or any(not t for t in tasks) or len(set(tasks)) != len(tasks):
        raise ValueError(f"--task {task!r}: expected one task or distinct tasks separated by commas (det,seg)")
    return tasks


VALUE_RULES = ("threshold", "coverage", "top_n", "search")  # the rules that take --value
WHOLE_VALUE_RULES = ("top_n", "search")  # ... as a number of experts


def check_rule_options(rule: str, value: float | None, search_error: str | None, dense: bool) -> None:
    """One line for an option the chosen rule would ignore or cannot take."""
    if rule not in RULES:
        raise ValueError(f"--rule {rule!r}; expected one of {list(RULES)}")
    if dense and rule != "auto":
        raise ValueError(f"--rule {rule} does not apply to --dense (a dense specialist folds each layer's top_k "
                         "experts by mean gate weight); leave --rule out")
    if value is not None and (dense or rule not in VALUE_RULES):
        raise ValueError(f"--value {value:g} applies to --rule {'/'.join(VALUE_RULES)} only; rule "
                         f"{'dense' if dense else rule} takes no value")
    if value is None and rule in VALUE_RULES:
        raise ValueError(f"--rule {rule} needs --value")
    if rule in WHOLE_VALUE_RULES and float(value) != int(value):
        raise ValueError(f"--rule {rule} --value {value:g}: expected a whole number of experts per layer")
    if search_error is not None and rule != "search":
        raise ValueError(f"--search-error {search_error} applies to --rule search only")


def resolve_rule(rule: str, modules: dict, task: str) -> str:
    """``auto`` is ``allowed`` for a task trained with an expert budget, ``selected`` otherwise."""
    if rule == "auto":
        return "allowed" if is_budgeted(modules, task) else "selected"
    return rule


def spread_notice(task: str, rule: str, kept: dict[str, list[int]], layers: dict[str, int]) -> str | None:
    """One line for an exact bundle (rule ``allowed`` or ``selected``) that keeps more than 60% of a
    task's experts: how many the task keeps per layer, and what gives a compact bundle."""
    used, total = sum(len(k) for k in kept.values()), sum(layers.values())
    if rule not in ("allowed", "selected") or used <= 0.6 * total:
        return None
    per_layer = ", ".join(f"{len(kept[layer])}/{n}" for layer, n in layers.items())
    why = (f"'{task}' may choose {per_layer} experts per MoE layer (its router was not narrowed in training)"
           if rule == "allowed" else f"'{task}' uses {per_layer} experts per MoE layer")
    return (f"note: {why}, so its exact bundle is not compact; train with train.expert_budget.experts=N for a "
            f"compact exact one, or pass --rule search --value N (the best N experts per layer by output error; "
            f"not exact)")


def overlap_with_other_tasks(modules: dict, tasks: list[str], kept: dict[str, list[int]], all_tasks: list[str]) -> dict:
    """Per MoE layer, the kept experts that each other task may also choose (its router's mask)."""
    others = [t for t in all_tasks if t not in tasks]
    return {layer: {u: sorted(set(kept[layer]) & set(allowed_experts({layer: m}, u)[layer]))
                    for u in others if u in m.router.tasks}
            for layer, m in modules.items()}


def select_experts(usage: ExpertUsage, modules: dict, task: str, rule: str, value: float | None) -> dict:
    """Per MoE layer, the experts ``task`` keeps under ``rule`` (a task added later chooses among
    only some of a layer's experts: it keeps among those)."""
    if rule == "allowed":
        return allowed_experts(modules, task)
    ti = usage.tasks.index(task)
    return {layer: select_layer(usage.counts[li, ti, :modules[layer].router.num_experts_for(task)], rule, value,
                                modules[layer].top_k, layer)
            for li, layer in enumerate(usage.layers)}


def extract_bundle(checkpoint: str | Path, task: str | list[str], out: str | Path, rule: str = "auto",
                   value: float | None = None, data_root: str | None = None, calibration_split: str = "train",
                   eval_split: str = "val", batch_size: int = 64, max_batches: int | None = None,
                   force: bool = False, log=print, dense: bool = False, distill_steps: int = 0,
                   distill_split: str = "train", archive: bool = False, search_error: str | None = None,
                   calibration_images: int = 256, latency_calls: int = 60, top_k: int | None = None) -> dict:
    """Run the whole extraction and write the bundle folder (and with ``archive`` its ``.tar.gz``);
    returns ``bundle.json``'s content. ``task``: one task, or several (``"det,seg"``) for one bundle
    answering each, each task routing among its own kept experts. ``dense``: a router-free
    specialist of one task (:mod:`.densify`), optionally distilled for ``distill_steps`` steps on
    the ``distill_split`` images (labels unused).

    Experts are chosen on ``calibration_images`` images (a fixed subset, 0: all) of the
    ``calibration_split`` split; metrics, and the lossless check of rule ``allowed``, use the
    ``eval_split`` split (``max_batches``: at most that many batches of it); rule ``selected`` is
    checked on its calibration images, the only ones on which it is exact. ``top_k``: the bundle
    routes each token to that many of its kept experts (fewer than the parent's: less compute, other
    outputs; the metrics say how much it costs, and no lossless check applies)."""
    out = Path(out)
    check_rule_options(rule, value, search_error, dense)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    tasks = parse_tasks(task)
    if dense and len(tasks) > 1:
        raise ValueError(f"--dense makes a specialist of one task; got {','.join(tasks)}")
    if distill_steps and not dense:
        raise ValueError("--distill-steps trains a dense specialist: add --dense")
    if calibration_images < 0:
        raise ValueError(f"--calibration-images {calibration_images}: expected 0 (all) or more")
    if latency_calls < 4:
        raise ValueError(f"--latency-calls {latency_calls}: expected at least 4 (medians and quartiles)")
    if top_k is not None and dense:
        raise ValueError("--top-k routes a bundle's experts; a --dense specialist has no router")
    full, model_file, run_cfg = load_generalist(checkpoint)
    for t in tasks:
        full.spec(t)  # unknown task -> lists the known ones
    parent_k = int(full.backbone.config["moe"]["top_k"])
    if top_k is not None and not 1 <= top_k <= parent_k:
        raise ValueError(f"--top-k {top_k}: expected 1 to the model's own top_k ({parent_k})")
    if run_cfg is None:
        raise ValueError(f"{model_file} has no config.json beside it; pass the training run directory")
    data_cfg = relocate_data(run_cfg["data"], data_root) if data_root else run_cfg["data"]
    task_cfg = {t: {**full.spec(t).config(), **run_cfg["tasks"].get(t, {})} for t in tasks}
    calib = {t: fixed_subset(build_dataset(t, task_cfg[t], data_cfg, calibration_split, False), calibration_images)
             for t in tasks}
    evalset = {t: build_dataset(t, task_cfg[t], data_cfg, eval_split, False) for t in tasks}  # (readers refuse empty splits)
    modules = full.backbone.moe_modules()
    layers = full.backbone.moe_layers()
    usage = ExpertUsage(layers, tasks)
    for t in tasks:
        log(f"expert usage of '{t}' on {len(calib[t])} images of the {calibration_split} split ...")
        task_usage(full, t, calib[t], batch_size, None, usage)
    size = int(full.backbone.config["img_size"])
    extra: dict = {}
    if dense:
        small, kept_per_task, extra = dense_specialist(full, tasks[0], calib[tasks[0]], evalset[tasks[0]], data_cfg,
                                                       task_cfg[tasks[0]], distill_split, distill_steps, batch_size,
                                                       max_batches, log)
        kept = {layer: kept_per_task[tasks[0]][layer]["experts"] for layer in layers}
        per_task_rule = {tasks[0]: "dense"}
        rule, value = "dense", None
    else:
        per_task_rule = {t: resolve_rule(rule, modules, t) for t in tasks}
        if rule == "auto":
            rule = per_task_rule[tasks[0]] if len(set(per_task_rule.values())) == 1 else "auto"
        kept_per_task = {}
        for t in tasks:
            if per_task_rule[t] == "search":
                log(f"searching {int(value)}-expert subsets of '{t}' on {len(calib[t])} {calibration_split} images ...")
                kept_per_task[t] = search_subsets(full, t, list(iterate_batches(calib[t], batch_size)), int(value),
                                                  log, search_error or "output")
            else:
                kept_per_task[t] = select_experts(usage, modules, t, per_task_rule[t], value)
            advice = spread_notice(t, per_task_rule[t], kept_per_task[t], layers)
            if advice:
                log(advice)
        kept = union_of(kept_per_task)
        small = extract_task(full, tasks, kept)
        if len(tasks) > 1:
            route_among_own(small, kept, kept_per_task)
        if top_k is not None and top_k != parent_k:
            small = with_top_k(small, top_k).train(full.training)
    lossless = None
    routed_as_parent = top_k is None or top_k == parent_k
    exact = [t for t in tasks if per_task_rule[t] in ("selected", "allowed") and routed_as_parent]
    if exact:
        per_task = {}
        for t in exact:
            # allowed is exact on every input: checked on the evaluation split; selected on its calibration images.
            on_eval = per_task_rule[t] == "allowed"
            split, images = (eval_split, evalset[t]) if on_eval else (calibration_split, calib[t])
            same, worst, n = outputs_identical(full, small, t, images, batch_size, max_batches if on_eval else None)
            per_task[t] = {"identical": same, "max_abs_diff": worst, "split": split, "images": n}
            log(f"lossless check of '{t}' on {n} images of the {split} split: outputs "
                + ("bit-identical to the full model" if same else f"differ (max |diff| {worst:.3g})"))
        lossless = {"identical": all(v["identical"] for v in per_task.values()),
                    "max_abs_diff": max(v["max_abs_diff"] for v in per_task.values()),
                    "split": per_task[exact[0]]["split"], "images": sum(v["images"] for v in per_task.values()),
                    "per_task": per_task, "conditions": exactness.describe()}
    metrics = {"full": {}, "bundle": {}}
    for t in tasks:
        metrics["full"][t] = evaluate(full, {t: evalset[t]}, batch_size, max_batches, progress=False)[t]
        metrics["bundle"][t] = evaluate(small, {t: evalset[t]}, batch_size, max_batches, progress=False)[t]
    latency = {f"batch{b}": alternating_latency_ms({"full": full, "bundle": small}, tasks[0], size, b, latency_calls)
               for b in (1, 8)}
    frequency = usage.frequency()
    info = {
        "format": BUNDLE_FORMAT,
        "tasks": tasks,
        **({"task": tasks[0]} if len(tasks) == 1 else {}),
        "kind": "dense" if dense else "moe",
        "parent_checkpoint": str(model_file),
        "parent_sha256": sha256_of(model_file),
        "kept_experts": kept,
        "kept_experts_per_task": kept_per_task if not dense else {tasks[0]: kept},
        "num_experts": layers,
        "top_k": {"parent": parent_k, "bundle": parent_k if top_k is None else top_k},
        "rule": {"name": rule, "value": value, "per_task": per_task_rule,
                 **({"error": search_error or "output"} if "search" in per_task_rule.values() else {})},
        "calibration_split": calibration_split,
        "calibration_images": {t: len(calib[t]) for t in tasks},
        "eval_split": eval_split,
        "eval_images": {t: min(len(evalset[t]), (max_batches or len(evalset[t])) * batch_size) for t in tasks},
        "data_root": str(data_cfg["root"]),
        "classes": {t: list(full.spec(t).options.get("class_names") or []) for t in tasks},
        "params": {"full": parameter_counts(full)["total"], "bundle": parameter_counts(small)["total"]},
        "flops_per_image": {"full": {t: flops_per_image(full, t, size) for t in tasks},
                            "bundle": {t: flops_per_image(small, t, size) for t in tasks}},
        "latency_ms": {"full": {b: v["full"]["median"] for b, v in latency.items()},
                       "bundle": {b: v["bundle"]["median"] for b, v in latency.items()},
                       "quartiles": {m: {b: [v[m]["q1"], v[m]["q3"]] for b, v in latency.items()}
                                     for m in ("full", "bundle")},
                       "calls": latency_calls, "alternating": True, "task": tasks[0]},
        "metrics": metrics,
        "chance": {t: chance_metrics(full, {t: evalset[t]})[t] for t in tasks},
        "lossless_check": lossless,
        "overlap": overlap_with_other_tasks(modules, tasks, kept, full.tasks) if not dense else {},
        "usage_frequency": {t: {layer: frequency[li, ti, :layers[layer]].tolist()
                                for li, layer in enumerate(usage.layers)} for ti, t in enumerate(tasks)},
        **extra,
    }
    write_bundle(out, small, info, force=force)
    if archive:
        info["archive"] = str(write_archive(out))
    return info


def dense_specialist(full: GeneralistModel, task: str, calib, evalset, data_cfg: dict, task_cfg: dict,
                     distill_split: str, distill_steps: int, batch_size: int, max_batches: int | None, log):
    """The folded dense model of ``task`` (distilled when ``distill_steps``), its kept experts and
    the report of the fold and the distillation."""
    from .densify import distill, fold, mean_gates, student_gap
    log(f"mean gate weights of '{task}' on the calibration images ...")
    gates = mean_gates(full, task, iterate_batches(calib, batch_size, max_batches))
    dense, kept = fold(full, task, gates)
    report = {"dense": {"folded": {layer: k for layer, k in kept.items()}}}
    probe = list(iterate_batches(calib, min(batch_size, 16), 2))
    report["dense"]["gap_folded"] = student_gap(dense, full, task, probe)
    if distill_steps:
        images = build_dataset(task, task_cfg, data_cfg, distill_split, False)
        batches = list(iterate_batches(fixed_subset(images, 16 * min(distill_steps, 64), 0), 16))
        report["dense"]["metrics_folded"] = evaluate(dense, {task: evalset}, batch_size, max_batches,
                                                     progress=False)[task]
        bar = progress_bar(total=distill_steps, desc="distill", leave=False)
        losses = distill(dense, full, task, batches, distill_steps,
                         progress=lambda i, loss: (bar.update(1), bar.set_postfix_str(f"loss={loss:.4f}")))
        bar.close()
        report["dense"].update(distill_steps=distill_steps, distill_split=distill_split,
                               distill_loss_first_last=[losses[0], losses[-1]],
                               gap_distilled=student_gap(dense, full, task, probe))
        log(f"distilled {distill_steps} steps on the {distill_split} images: feature and output gap "
            f"{report['dense']['gap_folded']:.4g} -> {report['dense']['gap_distilled']:.4g}")
    from .densify import timm_name
    report["timm"] = timm_name(dense)
    return dense, {task: {layer: k for layer, k in kept.items()}}, report


def run_usage(checkpoint: str | Path, split: str = "val", out: str | Path | None = None, batch_size: int = 64,
              max_batches: int | None = None) -> tuple[ExpertUsage, Path]:
    """Expert usage of every task of a run on ``split``; writes expert_usage.json/.png into ``out``
    (default: the run directory)."""
    model, model_file, run_cfg = load_generalist(checkpoint)
    if run_cfg is None:
        raise ValueError(f"{model_file} has no config.json beside it; pass a training run directory")
    usage = ExpertUsage.of(model.backbone, model.tasks)
    for task in model.tasks:
        task_cfg = {**model.spec(task).config(), **run_cfg["tasks"].get(task, {})}
        task_usage(model, task, build_dataset(task, task_cfg, run_cfg["data"], split, False), batch_size,
                   max_batches, usage)
    out = Path(out) if out else model_file.parent
    report.write_usage(out, usage, split=split)
    return usage, out
