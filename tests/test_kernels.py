"""The GPU path proven on the CPU: ``model.moe.kernel=grouped_mm`` runs ``torch._grouped_mm`` with
device offsets (the CUDA formulas: the forward, the input-gradient and the weight-gradient forms)
on the CPU, and must equal the per-expert loop; bf16 autocast training runs end to end."""
import warnings

import pytest
import torch

from moe_vision.moe import MoEAttention, MoEMLP
from moe_vision.moe import grouped
from moe_vision.moe.grouped import grouped_linear
from tests.tool_run import run_child, run_tool

pytestmark = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no torch._grouped_mm")

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _op_and_grads(kernel, x, counts, w, b, g):
    x, w, b = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    y = grouped_linear(x, counts, w, b, kernel)
    (y.float() * g).sum().backward()
    return y, x.grad, w.grad, b.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts", [[5, 0, 7, 3], [15, 0, 0, 0], [0, 0, 0, 0]], ids=["uneven", "skewed", "empty"])
def test_grouped_mm_forward_and_both_backward_forms_equal_the_loop(dtype, counts):
    torch.manual_seed(0)
    counts = torch.tensor(counts)
    A, E, I, O = int(counts.sum()), 4, 16, 24
    x, w, b = torch.randn(A, I, dtype=dtype), torch.randn(E, I, O, dtype=dtype), torch.randn(E, O, dtype=dtype)
    g = torch.randn(A, O)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # aligned shapes: no fallback notice
        fast = _op_and_grads("grouped_mm", x, counts, w, b, g)
    loop = _op_and_grads("loop", x, counts, w, b, g)
    for name, a, c in zip(("output", "input grad", "weight grad", "bias grad"), fast, loop):
        torch.testing.assert_close(a.float(), c.float(), atol=TOL[dtype], rtol=TOL[dtype], msg=name)
    idle = counts == 0
    assert torch.equal(fast[2][idle], torch.zeros_like(fast[2][idle]))  # an empty group's weight gradient is 0


def test_unaligned_shapes_fall_back_to_the_loop_with_one_notice():
    grouped._NOTICED.clear()
    torch.manual_seed(0)
    counts = torch.tensor([2, 3])
    x, w = torch.randn(5, 6), torch.randn(2, 6, 4)  # 6 fp32 = 24 bytes per row: not a multiple of 16
    with pytest.warns(UserWarning, match=r"kernel=grouped_mm: widths 6 -> 4 in torch.float32 are not multiples of "
                                         r"16 bytes; using the per-expert loop"):
        y = grouped_linear(x, counts, w, None, "grouped_mm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        grouped_linear(x, counts, w, None, "grouped_mm")
    torch.testing.assert_close(y, grouped_linear(x, counts, w, None, "loop"))
    with pytest.raises(ValueError, match="model.moe.kernel='fast'; expected one of"):
        MoEMLP(8, 16, ["a"], num_experts=2, top_k=1, kernel="fast")


def _layer(kernel, capacity_factor=0.0, added=(), skew=False):
    torch.manual_seed(0)
    layer = MoEMLP(16, 32, ["a", "b"], num_experts=4, top_k=2, capacity_factor=capacity_factor, kernel=kernel,
                   added_experts=added, task_added_groups={"b": len(added)} if added else None)
    with torch.no_grad():
        for gate in layer.router.gates.values():
            gate.weight.normal_(std=1.0)
            if skew:  # feature 0 is large: expert 0 takes every first choice, expert 3 nothing
                gate.weight[:, 0] = torch.linspace(4.0, -4.0, gate.weight.shape[0])
    return layer


def _forward_backward(layer, x, task="b"):
    x = x.clone().requires_grad_(True)
    y, _ = layer(x, task)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    return y.detach(), x.grad, [p.grad.clone() for p in layer.parameters() if p.grad is not None]


@pytest.mark.parametrize("capacity_factor,added,skew", [(0.0, (), False), (0.75, (), False), (0.0, (), True),
                                                        (0.0, (2,), False)],
                         ids=["dropless", "capacity", "skewed", "added_experts"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_moe_layer_with_grouped_mm_equals_the_loop(capacity_factor, added, skew, compiled):
    x = torch.randn(40, 16)
    if skew:
        x[:, 0] = 3.0
    ref = _forward_backward(_layer("loop", capacity_factor, added, skew), x)
    layer = _layer("grouped_mm", capacity_factor, added, skew)
    if compiled:
        torch._dynamo.reset()
        layer = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = _forward_backward(layer, x)
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(got[2], ref[2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_attention_experts_with_grouped_mm_equal_the_loop():
    torch.manual_seed(0)
    loop = MoEAttention(16, 4, ["a"], num_experts=4, top_k=2, kernel="loop")
    fast = MoEAttention(16, 4, ["a"], num_experts=4, top_k=2, kernel="grouped_mm")
    fast.load_state_dict(loop.state_dict())
    x = torch.randn(2, 10, 16)
    torch.testing.assert_close(fast(x, "a")[0], loop(x, "a")[0], atol=1e-5, rtol=1e-5)


def test_bf16_autocast_layer_with_grouped_mm_matches_the_loop():
    x = torch.randn(40, 16)
    outs = []
    for kernel in ("loop", "grouped_mm"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(_layer(kernel)(x, "a")[0])
    assert outs[0].dtype == torch.bfloat16
    torch.testing.assert_close(outs[1].float(), outs[0].float(), atol=2e-2, rtol=2e-2)


def _losses(run_dir):
    import json
    return [r["loss"] for r in map(json.loads, (run_dir / "train_log.jsonl").read_text().splitlines())]


def test_demo_model_trains_the_same_with_grouped_mm_and_the_loop(synthetic_root, tmp_path):
    """3 steps of the demo model (conv stem, 8 experts of width 384, every 2nd block) per kernel."""
    from moe_vision.engine.trainer import Trainer
    from tests.test_engine import make_cfg
    losses = {}
    for kernel in ("loop", "grouped_mm"):
        cfg = make_cfg(synthetic_root, tmp_path / kernel, "model=moe_vit_demo", "model.img_size=32",
                       "train.steps=3", "train.ckpt_every=0", "eval.max_batches=1", "eval.periodic_images=0",
                       f"model.moe.kernel={kernel}")
        Trainer(cfg).fit()
        losses[kernel] = _losses(tmp_path / kernel)
    assert len(losses["loop"]) == 3
    assert losses["grouped_mm"] == pytest.approx(losses["loop"], abs=1e-5)


def test_bf16_autocast_training_on_the_cpu_trains_and_evaluates(synthetic_root, tmp_path):
    import json
    from moe_vision.engine.trainer import Trainer
    from tests.test_engine import make_cfg
    trainer = Trainer(make_cfg(synthetic_root, tmp_path / "bf16", "train.precision=bf16", "train.steps=3",
                               "train.ckpt_every=0", "eval.max_batches=1", "eval.periodic_images=0"))
    assert trainer.amp_dtype == torch.bfloat16
    out = trainer.fit()
    losses = _losses(tmp_path / "bf16")
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    metrics = json.loads((tmp_path / "bf16" / "metrics.json").read_text())
    assert set(metrics) == {"cls", "det", "seg"} and out["metrics"]["det"]["mAP"] >= 0


def test_gpu_check_without_a_gpu_is_one_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = run_child("gpu_check.py", "--out", "/tmp/never.md")  # a real process: nothing else on its stderr
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: make gpu-check needs a CUDA GPU; this machine has none (torch.cuda.is_available() is False). A dry "
        "run of the same path: python tools/gpu_check.py --device cpu --quick --out /tmp/gpu.md"]


@pytest.mark.slow
def test_gpu_check_path_runs_on_the_cpu(tmp_path):
    from moe_vision.bench.gpu_check import gpu_check
    report = gpu_check(tmp_path / "gpu.md", "cpu", steps=8, quick=True, log=lambda m: None)
    assert {b["case"] for b in report["benchmark"]} == {"a", "c"} and report["real"]["measured"]["ms_per_step"] > 0
    text = (tmp_path / "gpu.md").read_text()
    assert "device-to-host copies" in text and (tmp_path / "gpu.json").is_file()
    assert report["matching"][0]["shape"] == "demo" and "| demo | 96 | 6 | 60 |" in text
