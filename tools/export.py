#!/usr/bin/env python
"""Export an expert bundle (or one task of a full model) for deployment, with a parity check.

    python tools/export.py --bundle experts/det --format onnx --out det.onnx
    python tools/export.py --bundle experts/seg --format torch_export --out seg.pt2 --postprocess
    python tools/export.py --checkpoint runs/synthetic --task cls --format onnx --out cls.onnx
    python tools/export.py --bundle experts/det --format onnx --out det.onnx --force --latency

The graph takes one input, ``images`` [batch, 3, S, S] (normalised like training; the batch is
dynamic), and returns the task's raw outputs (the first is the head's raw logits), plus with
--postprocess the final ones (det: boxes in input pixels, scores, labels; seg: the label map;
cls: probabilities; depth: metres). MoE layers run every kept expert on every token (static
shapes; the same function as the sparse path). Before the file is kept, ONNX Runtime (CPU) or
the torch.export program and PyTorch are run on random images (batch 1 and 3) and on the
calibration images of the run's data (the task's val split): every output must agree within
--tolerance and the task metric must agree to 1e-4 (whether it is identical is reported), else
nothing is written. A report goes to
<out>.json. ONNX needs the export extra: pip install -e '.[export]'.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moe_vision.cli import user_errors
from moe_vision.engine.report import write_json
from moe_vision.export.pipeline import TOLERANCE, export_model, latency_table, load_source
from moe_vision.export.runtime import FORMATS


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", type=Path, help="bundle folder (tools/extract_experts.py)")
    src.add_argument("--checkpoint", type=Path, help="full model: run directory or model .safetensors")
    ap.add_argument("--task", default=None, help="task to export (default: the bundle's task)")
    ap.add_argument("--format", default="onnx", help=f"one of {', '.join(FORMATS)}")
    ap.add_argument("--out", required=True, type=Path, help="file to write (e.g. det.onnx, det.pt2)")
    ap.add_argument("--postprocess", action="store_true", help="also output the postprocessed predictions")
    ap.add_argument("--data-root", default=None, help="override data.root of the run's config (calibration images)")
    ap.add_argument("--split", default="val", help="split of the calibration images")
    ap.add_argument("--calib-images", type=int, default=64, help="calibration images for the parity check (0: none)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--tolerance", type=float, default=TOLERANCE, help="max |difference| allowed on any output")
    ap.add_argument("--latency", action="store_true",
                    help="also time eager full model, eager bundle and the exported file (batch 1 and 8); added to <out>.json")
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    args = ap.parse_args()
    with user_errors():
        r = export_model(args.out, args.format, args.bundle, args.checkpoint, args.task, args.postprocess,
                         args.data_root, args.split, args.calib_images, args.batch_size, args.tolerance, args.force)
        print(f"\n{args.out}: task '{r['task']}' ({r['type']}), {args.format}, outputs {', '.join(r['outputs'])}")
        print(f"  parity on {r['parity_images']['random']} random + {r['parity_images']['calibration']} calibration "
              f"images: max |diff| {r['max_abs_diff']:.2e} (tolerance {r['tolerance']:g})")
        for name, v in r["parity"].items():
            extra = f", {v['mismatches']} differing elements" if v["mismatches"] else ""
            print(f"    {name:<16} max |diff| {v['max_abs_diff']:.2e}{extra}")
        if r["metrics"]:
            m = r["metrics"]
            print(f"  task metric: exported {json.dumps(m['exported'])}; PyTorch "
                  + ("identical" if m["identical"] else f"{json.dumps(m['pytorch'])} (max |diff| {m['max_abs_diff']:.1e})"))
        cost, f = r["moe_cost"], r["flops_per_image"]
        print(f"  MoE layers: every kept expert on every token = {cost['expert_flops_ratio']:.2f}x the sparse "
              f"path's expert FLOPs; whole model {f['exported'] / 1e9:.3f} vs {f['sparse'] / 1e9:.3f} GFLOPs/image "
              f"({f['exported'] / f['sparse']:.2f}x)")
        if args.latency:
            model, task, _, source = load_source(args.bundle, args.checkpoint, args.task)
            full = None
            if args.bundle and Path(source["parent_checkpoint"]).is_file():
                from moe_vision.engine.builders import load_generalist
                full = load_generalist(source["parent_checkpoint"])[0]
            rows = latency_table(args.out, args.format, model, task, full)
            print("\n  | model | batch | ms per call | ms per image |\n  |---|---:|---:|---:|")
            for row in rows:
                print(f"  | {row['model']} | {row['batch']} | {row['ms']:.1f} | {row['ms_per_image']:.2f} |")
            write_json(Path(f"{args.out}.json"), {**r, "latency": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
