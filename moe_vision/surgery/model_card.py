"""The model card of a bundle: ``README.md`` beside ``bundle.json`` (its machine-readable twin),
written from the same dictionary, so the two cannot disagree."""
from __future__ import annotations

PRIMARY = {"cls": "top1", "det": "mAP50", "seg": "mIoU", "depth": "delta1"}


def _pct(v) -> str:
    return f"{100 * v:.1f}" if isinstance(v, (int, float)) else "-"


def _metric_rows(info: dict) -> list[str]:
    rows = ["| task | metric | bundle | full model | chance |", "|---|---|---:|---:|---:|"]
    folded = (info.get("dense") or {}).get("metrics_folded")
    for task in info["tasks"]:
        bundle, full = info["metrics"]["bundle"][task], info["metrics"]["full"][task]
        chance = (info.get("chance") or {}).get(task, {})
        for metric in bundle:
            unit = metric not in ("rmse", "absrel")  # fractions shown in percent; depth errors in metres
            fmt = _pct if unit else (lambda v: f"{v:.3f}" if isinstance(v, (int, float)) else "-")
            extra = f" (folded, before distillation: {fmt(folded[metric])})" if folded and metric in folded else ""
            rows.append(f"| {task} | {metric}{'' if unit else ' (m)' if metric == 'rmse' else ''} | "
                        f"{fmt(bundle[metric])}{extra} | {fmt(full[metric])} | {fmt(chance.get(metric))} |")
    return rows


def model_card(info: dict, name: str = "this bundle") -> str:
    """Markdown: what the bundle answers, where it comes from, how good, how big and fast, what it
    keeps, how to load it, and its limits."""
    tasks = info["tasks"]
    dense = info.get("kind") == "dense"
    kind = "a dense specialist (no router, no experts: plain ViT MLPs)" if dense else \
        "a mixture-of-experts bundle (the kept experts and each task's router)"
    rule = info["rule"]["name"] + (f" {info['rule']['value']:g}" if info["rule"].get("value") is not None else "")
    classes = []
    for task in tasks:
        names = (info.get("classes") or {}).get(task) or []
        classes.append(f"- `{task}`: {len(names)} classes ({', '.join(names[:12])}{', ...' if len(names) > 12 else ''})"
                       if names else f"- `{task}`: classes not named in the parent's config")
    p, f, t = info["params"], info["flops_per_image"], info["latency_ms"]
    lines = [f"# {name}: {', '.join(tasks)}", "",
             f"A model extracted from a moe-vision generalist: {kind}, answering {', '.join(f'`{x}`' for x in tasks)}.",
             "`bundle.json` beside this file holds the same facts for programs.", "",
             "## Tasks and classes", "", *classes, "",
             "## Origin", "",
             f"- parent checkpoint: `{info['parent_checkpoint']}`",
             f"- parent sha256: `{info['parent_sha256']}`",
             f"- selection: rule `{rule}` on the `{info['calibration_split']}` split (calibration); "
             f"metrics on the `{info['eval_split']}` split of `{info.get('data_root', '-')}`",
             ]
    if dense and info.get("dense", {}).get("distill_steps"):
        d = info["dense"]
        lines.append(f"- distilled {d['distill_steps']} steps on the `{d['distill_split']}` images (no labels) to "
                     f"match the MoE model's features and outputs (gap {d['gap_folded']:.4g} -> {d['gap_distilled']:.4g})")
    lines += ["", "## Metrics", "", *_metric_rows(info), "",
              "Percent, except depth errors; chance = an input-blind predictor (most frequent class, one whole-image "
              "box, constant depth).", "",
              "## Size and speed", "",
              "| | parameters | GFLOPs per image | latency batch 1 (ms) | latency batch 8 (ms) |",
              "|---|---:|---:|---:|---:|",
              f"| bundle | {p['bundle'] / 1e6:.2f}M | {f['bundle'][tasks[0]] / 1e9:.3f} | "
              f"{_latency(t, 'bundle', 'batch1')} | {_latency(t, 'bundle', 'batch8')} |",
              f"| full model | {p['full'] / 1e6:.2f}M | {f['full'][tasks[0]] / 1e9:.3f} | "
              f"{_latency(t, 'full', 'batch1')} | {_latency(t, 'full', 'batch8')} |", "",
              f"FLOPs and latency of `{tasks[0]}`, PyTorch eager on the machine that extracted the bundle"
              + (f": medians (quartiles) of {t['calls']} calls, the two models called in turn." if "quartiles" in t
                 else "."), "",
              "## Experts kept per layer", "",
              "| layer | kept (of) | experts |", "|---|---:|---|"]
    for layer, kept in info["kept_experts"].items():
        lines.append(f"| {layer} | {len(kept)} / {info['num_experts'][layer]} | {kept} |")
    if not dense and len(tasks) > 1:
        lines += ["", "Each task's own selection: " + "; ".join(
            f"`{task}` " + ", ".join(f"{layer} {k}" for layer, k in per.items())
            for task, per in info["kept_experts_per_task"].items())]
    if info.get("lossless_check"):
        lc = info["lossless_check"]
        lines += ["", "Lossless check: outputs " + ("bit-identical to the full model" if lc["identical"] else
                                                   f"differ from the full model (max |diff| {lc['max_abs_diff']:.3g})")
                  + " on " + "; ".join(f"{v.get('images', '?')} `{v['split']}` images of `{t}`"
                                       for t, v in lc["per_task"].items())
                  + _conditions(lc.get("conditions")) + "."]
    example = tasks[0]
    lines += ["", "## Load it", "", "```python", "import moe_vision",
              f'model = moe_vision.load_bundle("{name}")        # this folder, or {name}.tar.gz',
              f'preds = moe_vision.predict(model, "{example}", ["photo.jpg"])   # in each image\'s pixels', "```", "",
              "Or from the command line: `python tools/predict.py --bundle " + name + (f" --task {example}" if len(tasks) > 1 else "")
              + " photos/ --out preds`.", ""]
    if dense and info.get("timm"):
        lines += ["The backbone also loads into timm's ViT: "
                  "`moe_vision.surgery.densify.timm_state_dict(model, task)` with "
                  f"`timm.create_model(\"{info['timm']}\", num_classes=0)`.", ""]
    lines += ["## Limits", "",
              "- It answers only the tasks above, with the classes the parent was trained on.",
              "- Images are resized as the parent was trained (the input size and resize mode are stored in the "
              "model's config); its metrics come from the evaluation split named above, not from your data.",
              ]
    per_task_rule = info["rule"].get("per_task") or {t: info["rule"]["name"] for t in tasks}
    checks = (info.get("lossless_check") or {}).get("per_task") or {}
    for task in tasks:
        lines.append(f"- `{task}`: " + _caveat(per_task_rule[task], checks.get(task), rule))
    return "\n".join(lines) + "\n"


def _latency(t: dict, model: str, batch: str) -> str:
    q = (t.get("quartiles") or {}).get(model, {}).get(batch)
    return f"{t[model][batch]:.1f}" + (f" ({q[0]:.1f}-{q[1]:.1f})" if q else "")


def _caveat(rule: str, check: dict | None, rule_text: str) -> str:
    """What a task's rule promises, stated no further than its lossless check found."""
    if rule == "dense":
        return ("the folded MLPs approximate the routed experts with their mean gates; distillation narrows the "
                "gap, the metrics above say how far.")
    if rule in ("allowed", "selected"):
        where = (f"on the {check['images']} images of the `{check['split']}` split it was checked on"
                 if check else "on the images it was checked on")
        if check and not check["identical"]:
            return (f"rule `{rule}` should be exact, but its outputs differ from the full model {where} (max |diff| "
                    f"{check['max_abs_diff']:.3g}): see docs/exactness.md for the conditions.")
        if rule == "allowed":
            return ("rule `allowed` keeps every expert the task's router may choose (training narrowed it to them): "
                    f"the task routes as in the full model on every input; outputs bit-identical {where}.")
        return ("rule `selected` keeps every expert the task's router chose on the calibration images: outputs "
                f"bit-identical {where}; on other images a token may want an expert that was cut (its next choice "
                "answers instead).")
    return (f"rule `{rule_text}` drops experts the router did choose: outputs differ from the full model (see the "
            "metrics).")


def _conditions(conditions: dict | None) -> str:
    """Where the check ran, in words (the precondition of the bit-for-bit claim: docs/exactness.md)."""
    if not conditions:
        return ""
    mkl = conditions.get("mkl_cbwr")
    return f" (torch {conditions['torch']}" + (f", MKL_CBWR={mkl}" if mkl else "") + ")"
