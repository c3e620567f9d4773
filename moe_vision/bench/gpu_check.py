"""``make gpu-check``: every GPU figure we publish, from one command on one GPU (sized to a few
minutes; not yet run on one), written to ``docs/results/gpu.md`` (and ``gpu.json``):

1. the CUDA test subset (``pytest -m cuda``: the grouped operator's ``torch._grouped_mm`` path in
   bf16 against the loop, the compiled layer, padding invariance, a bf16 autocast training step);
2. the MoE layer benchmark, eager and compiled, cases a (the layer) and c (a ViT-S training step),
   bf16, against a dense MLP / ViT of equal active FLOPs;
3. ``experiment=real`` for ``--steps`` steps on generated real-size fixtures (bf16, loader
   workers): milliseconds per step, images per second and peak memory, beside the figures
   computed from FLOPs in docs/real_data.md;
4. a profile of training steps between two log steps: device-to-host copies and synchronisations
   per step;
5. detection's one-to-one matching, the device solver against scipy (with the copy it needs), on
   the demo's shape and on COCO-like ones (``tasks.det.matcher``).

``tools/gpu_check.py --device cpu --quick`` runs the same path in seconds (for the tests); its
figures mean nothing.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[2]


def machine(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": sys.version.split()[0], "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, memory_gb=round(props.total_memory / 2 ** 30, 1), cuda=torch.version.cuda,
                    grouped_mm=hasattr(torch, "_grouped_mm"))
    return info


def cuda_tests(log: Callable[[str], None]) -> dict:
    """The tests marked ``cuda`` (they skip without a GPU), in a child process."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
                        str(ROOT / "tests" / "test_cuda.py")], cwd=ROOT, capture_output=True, text=True)
    summary = (r.stdout.strip().splitlines() or [""])[-1]
    log(f"CUDA tests: {summary}")
    return {"returncode": r.returncode, "summary": summary, "failures": r.stdout[-4000:] if r.returncode else ""}


def moe_benchmark(device: torch.device, quick: bool, log: Callable[[str], None]) -> list[dict]:
    """Cases a and c, eager and compiled, in bf16 (fp32 on the CPU)."""
    from .moe import CASES, run_layer_case, run_model_case
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    warmup, repeats = (0, 1) if quick else (3, 9)
    rows = []
    for name in ("a", "c"):
        case = CASES[name]
        if quick:
            case = dataclasses.replace(case, **({"tokens": 64} if name == "a" else {"batch": 1, "img_size": 32}))
        for compiled in (False, True):
            if name == "a":
                r = run_layer_case(case, device, dtype, warmup, repeats, with_fairscale=False, with_naive=False,
                                   compiled=compiled)
            else:
                r = run_model_case(case, device, dtype, warmup, max(1, repeats // 2), compiled=compiled)
            rows.append({"case": name, "compiled": compiled, "ours_ms": r.times_ms["ours"],
                         "dense_ms": r.times_ms["dense"], "ratio": r.ratio_vs_dense, "target": r.target_ratio,
                         "expert_share": r.expert_share})
            log(f"MoE benchmark case {name} {'compiled' if compiled else 'eager'}: {r.ratio_vs_dense:.2f}x dense")
    return rows


# (name, decoder layers x images, objects per image, queries): the demo's det loss, and COCO-like ones.
MATCHING_SHAPES = (("demo", 3 * 32, 6, 60), ("coco-16", 6 * 16, 16, 300), ("coco-40", 6 * 16, 40, 300))


def matching_benchmark(device: torch.device, quick: bool, log: Callable[[str], None]) -> list[dict]:
    """Milliseconds per det loss's matching: :func:`device_assignment` (nothing read back) against
    scipy (the cost copied to the host, then one solve per image), on random costs."""
    from scipy.optimize import linear_sum_assignment
    from ..tasks.matching import device_assignment
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    shapes = MATCHING_SHAPES[:1] if quick else MATCHING_SHAPES
    rows = []
    for name, problems, objects, queries in shapes:
        cost = torch.rand(problems, objects, queries, device=device)
        counts = [objects] * problems
        times = {}
        for solver in ("device", "scipy"):
            best = float("inf")
            for _ in range(1 if quick else 5):
                sync()
                t0 = time.perf_counter()
                if solver == "device":
                    device_assignment(cost, counts)
                    sync()
                else:
                    host = cost.double().cpu().numpy()
                    for c in host:
                        linear_sum_assignment(c.T)
                best = min(best, time.perf_counter() - t0)
            times[solver] = best * 1e3
        rows.append({"shape": name, "problems": problems, "objects": objects, "queries": queries,
                     "device_ms": times["device"], "scipy_ms": times["scipy"]})
        log(f"matching {name}: device {times['device']:.1f} ms, scipy with the copy {times['scipy']:.1f} ms")
    return rows


def _copies_per_step(prof, steps: int) -> dict:
    names = [e.name for e in prof.events()]
    dtoh = sum(1 for n in names if "Memcpy DtoH" in n or "Memcpy Device -> Host" in n)
    syncs = sum(1 for n in names if n in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"))
    return {"device_to_host_copies_per_step": dtoh / steps, "synchronisations_per_step": syncs / steps}


def real_recipe(device: torch.device, steps: int, quick: bool, log: Callable[[str], None]) -> dict:
    """``experiment=real`` on fixtures: timing, throughput, memory; then a profile of non-log steps."""
    from ..data.fixtures import FixtureSizes, make_real_layout
    from ..engine.profile import quiet_profile
    from ..engine.steplog import StepLog
    from ..engine.trainer import Trainer
    from .data import compose_experiment, step_report
    with tempfile.TemporaryDirectory() as tmp:
        sizes = FixtureSizes(classes=4, per_class=2, coco=8, ade=8) if quick else \
            FixtureSizes(classes=20, per_class=32, coco=160, ade=160)
        root = make_real_layout(Path(tmp) / "data", sizes)
        overrides = [f"train.steps={steps}", "train.epochs=null", "train.eval_every=0", "train.ckpt_every=0",
                     "train.log_every=10", "eval.max_batches=1", f"device={device}", f"output_dir={tmp}/run"]
        if quick:
            overrides += ["model=moe_vit_nano", "model.img_size=64", "decoder.dim=32", "decoder.num_layers=1",
                          "decoder.num_heads=2", "tasks.cls.img_size=64", "tasks.det.img_size=96",
                          "tasks.seg.img_size=80", "tasks.cls.batch_size=2", "tasks.det.batch_size=2",
                          "tasks.seg.batch_size=2", "data.num_workers=0", "data.tasks.cls.num_workers=0",
                          "train.precision=fp32"]
        cfg = compose_experiment("real", overrides, root)
        trainer = Trainer(cfg)
        log_every = int(cfg["train"]["log_every"])
        steplog = StepLog(trainer.dist)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        warm = min(20, steps // 4)
        t0 = None
        for i in range(steps):
            if i == warm:
                sync()
                t0 = time.perf_counter()
            steplog.add(trainer.train_step())
            if trainer.step % log_every == 0:
                steplog.flush()
        sync()
        seconds = (time.perf_counter() - t0) / max(1, steps - warm)
        steplog.flush()
        per_step_images = sum(int(cfg["tasks"][t]["batch_size"]) for t in trainer.tasks) / len(trainer.tasks) \
            * int(cfg["train"]["sampling"].get("tasks_per_step", 1))
        measured = {"steps": steps, "ms_per_step": seconds * 1e3, "images_per_second": per_step_images / seconds,
                    "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda"
                    else None}
        log(f"experiment=real: {measured['ms_per_step']:.1f} ms per step, {measured['images_per_second']:.0f} img/s")
        # A profile of the steps between two log steps.
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        n = max(1, log_every - 2)
        with quiet_profile(activities) as prof:
            for _ in range(n):
                steplog.add(trainer.train_step())
            sync()
        steplog.flush()
        computed = step_report(cfg, 1, 989.0, 0.35)
        return {"measured": measured, "profile": _copies_per_step(prof, n),
                "computed": {"ms_per_step": computed["step_seconds"] * 1e3, "memory_gb": computed["memory_gb"],
                             "parameters": computed["parameters"]}}


def format_markdown(r: dict) -> str:
    m = r["machine"]
    lines = ["# Results: the GPU check (`make gpu-check`)", "",
             f"Machine: {m.get('gpu', m['device'])}, torch {m['torch']}, CUDA {m.get('cuda', '-')}, "
             f"Python {m['python']}; {r['date']}.", ""]
    t = r.get("tests")
    if t:
        lines += [f"CUDA tests (`pytest -m cuda`): {t['summary']}", ""]
    lines += ["| MoE benchmark case | mode | ours ms | dense ms | ours / dense | target | expert GEMMs |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for b in r["benchmark"]:
        lines.append(f"| {b['case']} | {'compiled' if b['compiled'] else 'eager'} | {b['ours_ms']:.2f} | "
                     f"{b['dense_ms']:.2f} | {b['ratio']:.2f}x | <= {b['target']} | {b['expert_share']:.0%} |")
    rr = r["real"]
    meas, comp, prof = rr["measured"], rr["computed"], rr["profile"]
    peak = f"{meas['peak_memory_gb']:.1f} GB" if meas["peak_memory_gb"] is not None else "-"
    lines += ["", f"`experiment=real` on generated real-size fixtures, {meas['steps']} steps:", "",
              "| | measured | computed (docs/real_data.md) |", "|---|---:|---:|",
              f"| ms per step | {meas['ms_per_step']:.1f} | {comp['ms_per_step']:.1f} |",
              f"| images per second | {meas['images_per_second']:.0f} | |",
              f"| peak memory | {peak} | {comp['memory_gb']:.1f} GB |",
              "", f"Profile of the steps between two log steps: {prof['device_to_host_copies_per_step']:.1f} "
                  f"device-to-host copies and {prof['synchronisations_per_step']:.1f} synchronisations per step "
                  "(`tasks.det.matcher=auto`: detection matches on the device while no image has more than "
                  "`matcher_device_max_objects` objects, otherwise its cost matrices go to the host once per det loss)."]
    if r.get("matching"):
        lines += ["", "Detection's one-to-one matching per det loss (random costs; scipy includes the copy):", "",
                  "| shape | layers x images | objects | queries | device ms | scipy ms |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {m['shape']} | {m['problems']} | {m['objects']} | {m['queries']} | {m['device_ms']:.1f} | "
                  f"{m['scipy_ms']:.1f} |" for m in r["matching"]]
    return "\n".join(lines) + "\n"


def gpu_check(out: str | Path = ROOT / "docs" / "results" / "gpu.md", device: str = "cuda", steps: int = 200,
              quick: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run every part and write ``out`` (markdown) and its ``.json`` twin."""
    from ..io_utils import atomic_path
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("make gpu-check needs a CUDA GPU; this machine has none (torch.cuda.is_available() is "
                         "False). A dry run of the same path: python tools/gpu_check.py --device cpu --quick "
                         "--out /tmp/gpu.md")
    report = {"machine": machine(device), "date": time.strftime("%Y-%m-%d")}
    if device.type == "cuda":
        report["tests"] = cuda_tests(log)
    report["benchmark"] = moe_benchmark(device, quick, log)
    report["real"] = real_recipe(device, steps, quick, log)
    report["matching"] = matching_benchmark(device, quick, log)
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_text(format_markdown(report))
    with atomic_path(out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    return report
