#!/usr/bin/env python
"""Pull one or several tasks' experts out of a trained generalist into a compact stand-alone bundle.

    python tools/extract_experts.py --task det --checkpoint runs/synthetic --out experts/det
    python tools/extract_experts.py --task det,seg --checkpoint runs/synthetic --out experts/det-seg
    python tools/extract_experts.py --task det --checkpoint runs/synthetic --out experts/det-top2 --rule top_n --value 2
    python tools/extract_experts.py --task det --checkpoint runs/synthetic --out experts/det-s2 --rule search --value 2
    python tools/extract_experts.py --task det --checkpoint runs/synthetic --out experts/det-dense --dense --distill-steps 300
    python tools/extract_experts.py --task seg --checkpoint runs/synthetic --out experts/seg --archive --force
    python tools/extract_experts.py --task det --checkpoint runs/synthetic --out experts/det-top1 --top-k 1

Rules: auto (the default: allowed for a model trained with train.expert_budget, else selected),
allowed (the experts the task's router may choose, its mask: exact on every input, checked on the
evaluation split), selected (every expert the task's router picked on the calibration images;
checked lossless on them), coverage (most used experts up to a share of selections), threshold
(experts with at least that share), top_n, search (per layer the N-expert subset whose effect on
the task's outputs, or with --search-error layer on the layer's output, is least on the
calibration images; not exact). Experts are chosen on 256 training images by default; metrics
come from the validation split. When an exact bundle would keep most experts, one line says how
many the task keeps per layer and what gives a compact bundle. Several tasks (det,seg): one bundle
answering each, with per layer the union of their kept experts (each task routing among its own),
each task's router rows and head, the shared decoder once. --dense: a
specialist of one task with no router and no experts: per layer the top_k experts by mean gate
weight, folded into one plain MLP (a dense ViT block; timm's ViT loads a patch-stem backbone), then
optionally --distill-steps steps of label-free distillation towards the MoE model on
--distill-split images. Every bundle folder gets bundle.json and a README.md model card; --archive
also writes <out>.tar.gz, which moe_vision.load_bundle opens directly. Data comes from the run's
config.json (override with --data-root). --top-k 1: the bundle routes each token to one of its
kept experts instead of the parent's top_k (less compute in PyTorch's sparse path; other outputs,
so no lossless check: the metrics show what it costs).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe_vision.cli import user_errors
from moe_vision.surgery.pipeline import extract_bundle
from moe_vision.surgery.select import RULES, SEARCH_ERRORS


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True, help="a task, or several separated by commas (det,seg)")
    ap.add_argument("--checkpoint", required=True, type=Path, help="training run directory or model .safetensors")
    ap.add_argument("--out", required=True, type=Path, help="bundle folder to write (e.g. experts/det)")
    ap.add_argument("--rule", default="auto", choices=RULES,
                    help="which experts each task keeps (see above; default auto)")
    ap.add_argument("--value", type=float, default=None,
                    help="threshold / coverage: a fraction of the task's selections; top_n / search: experts per layer")
    ap.add_argument("--search-error", default=None, choices=SEARCH_ERRORS,
                    help="--rule search: compare the task's outputs (default) or each layer's output")
    ap.add_argument("--dense", action="store_true", help="a router-free dense specialist of one task")
    ap.add_argument("--distill-steps", type=int, default=0, help="--dense: distillation steps (0: fold only)")
    ap.add_argument("--distill-split", default="train", help="--dense: split whose images distillation uses")
    ap.add_argument("--archive", action="store_true", help="also write <out>.tar.gz (moe_vision.load_bundle reads it)")
    ap.add_argument("--calibration-split", default="train",
                    help="split whose images decide the experts (default train: metrics come from --eval-split)")
    ap.add_argument("--calibration-images", type=int, default=256,
                    help="a fixed subset of that many calibration images (0: all; default 256)")
    ap.add_argument("--eval-split", default="val",
                    help="split of the reported metrics and of rule allowed's lossless check")
    ap.add_argument("--data-root", default=None, help="override data.root of the run's config")
    ap.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    ap.add_argument("--max-batches", type=int, default=None,
                    help="evaluate (metrics, allowed's lossless check) on at most this many batches of --eval-split "
                         "(default: all of it)")
    ap.add_argument("--latency-calls", type=int, default=60,
                    help="forward passes per model and batch size for the latency figures (default 60)")
    ap.add_argument("--top-k", type=int, default=None,
                    help="experts per token in the bundle (default: the parent's top_k; fewer: less compute)")
    ap.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    args = ap.parse_args()
    with user_errors():
        if args.distill_steps < 0:
            raise ValueError(f"--distill-steps {args.distill_steps}: expected 0 or more")
        info = extract_bundle(args.checkpoint, args.task, args.out, args.rule, args.value, args.data_root,
                              args.calibration_split, args.eval_split, args.batch_size, args.max_batches, args.force,
                              dense=args.dense, distill_steps=args.distill_steps, distill_split=args.distill_split,
                              archive=args.archive, search_error=args.search_error,
                              calibration_images=args.calibration_images, latency_calls=args.latency_calls,
                              top_k=args.top_k)
    rule = info["rule"]["name"] + (f"={info['rule']['value']:g}" if info["rule"]["value"] is not None else "")
    k = info["top_k"]
    routing = f", top-{k['bundle']} routing instead of top-{k['parent']}" if k["bundle"] != k["parent"] else ""
    print(f"\nbundle {args.out} ({info['kind']}) for task(s) {', '.join(info['tasks'])} (rule {rule}{routing})")
    for layer, kept in info["kept_experts"].items():
        shared = "; ".join(f"shares {len(e)} with {u}" for u, e in info.get("overlap", {}).get(layer, {}).items())
        print(f"  {layer:<16} kept {len(kept)}/{info['num_experts'][layer]} experts {kept}" + (f" ({shared})" if shared else ""))
    p, f, t = info["params"], info["flops_per_image"], info["latency_ms"]
    first = info["tasks"][0]
    print(f"  parameters   {p['full'] / 1e6:.2f}M -> {p['bundle'] / 1e6:.2f}M ({p['bundle'] / p['full']:.0%})")
    print(f"  GFLOPs/image {f['full'][first] / 1e9:.3f} -> {f['bundle'][first] / 1e9:.3f} ({first})")
    for b in ("batch1", "batch8"):
        q = t["quartiles"]
        print(f"  latency {b[5:]:>2}   {t['full'][b]:.1f} ms ({q['full'][b][0]:.1f}-{q['full'][b][1]:.1f}) -> "
              f"{t['bundle'][b]:.1f} ms ({q['bundle'][b][0]:.1f}-{q['bundle'][b][1]:.1f}) ({first}, PyTorch eager, "
              f"medians and quartiles of {t['calls']} alternating calls)")
    for task in info["tasks"]:
        for m, v in info["metrics"]["full"][task].items():
            print(f"  {task:<5}{m:<9} {v:.4f} -> {info['metrics']['bundle'][task][m]:.4f}")
    if info["lossless_check"] is not None:
        lc = info["lossless_check"]
        print("  lossless check: " + ("outputs bit-identical to the full model" if lc["identical"]
                                      else f"outputs differ (max |diff| {lc['max_abs_diff']:.3g})"))
    print(f"  model card: {args.out / 'README.md'}" + (f"; archive: {info['archive']}" if info.get("archive") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
