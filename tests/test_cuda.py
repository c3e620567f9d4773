"""The CUDA path, run by ``make gpu-check`` on a GPU machine (``pytest -m cuda``; skipped elsewhere):
``torch._grouped_mm`` with device offsets in bf16 against the loop, the compiled layer, padding
invariance on the GPU, a bf16 autocast training step with no host read between log steps."""
import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)")]


def _layer(kernel, device="cuda"):
    from moe_vision.moe import MoEMLP
    torch.manual_seed(0)
    layer = MoEMLP(64, 128, ["a"], num_experts=8, top_k=2, kernel=kernel).to(device)
    with torch.no_grad():
        layer.router.gates["a"].weight.normal_(std=1.0)
    return layer


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_grouped_mm_on_cuda_bf16_equals_the_loop(compiled):
    x = torch.randn(512, 64, device="cuda")
    outs = {}
    for kernel in ("loop", "grouped_mm"):
        layer = _layer(kernel)
        fn = torch.compile(layer, fullgraph=True) if compiled and kernel == "grouped_mm" else layer
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, _ = fn(xx, "a")
        y.float().sum().backward()
        outs[kernel] = (y.float(), xx.grad, layer.experts.w1.grad.float())
    for a, b in zip(outs["grouped_mm"], outs["loop"]):
        torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)


def test_auto_picks_grouped_mm_on_cuda_half_types():
    from moe_vision.moe.grouped import use_grouped_mm
    x, w = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16), torch.randn(2, 64, 32, device="cuda",
                                                                                 dtype=torch.bfloat16)
    assert use_grouped_mm("auto", x, w) and not use_grouped_mm("auto", x.float(), w.float())


def test_padding_invariance_on_the_gpu():
    import timm
    import moe_vision  # noqa: F401
    from moe_vision.tasks import GeneralistModel
    torch.manual_seed(0)
    bb = timm.create_model("moe_vit_nano_patch8", tasks=["seg"], img_size=64, moe={"num_experts": 4})
    model = GeneralistModel(bb, {"seg": {"num_classes": 5}}, {"dim": 32, "num_queries": 8, "num_layers": 1,
                                                               "num_heads": 2}).cuda().eval()
    image = torch.randn(1, 3, 48, 40, device="cuda")
    canvas = torch.zeros(2, 3, 64, 64, device="cuda")
    canvas[0, :, :48, :40] = image[0]
    sizes = torch.tensor([[48, 40], [64, 64]])
    with torch.no_grad():
        alone = model(image, "seg", input_sizes=sizes[:1])["masks"]
        padded = model(canvas, "seg", input_sizes=sizes)["masks"][:1, :, :alone.shape[-2], :alone.shape[-1]]
    torch.testing.assert_close(padded, alone, atol=1e-4, rtol=1e-4)


def test_bf16_training_steps_on_cuda_read_nothing_between_log_steps(synthetic_root, tmp_path):
    from moe_vision.engine.steplog import StepLog
    from moe_vision.engine.trainer import Trainer
    from tests.test_engine import make_cfg
    from tests.test_host_reads import HOST_DATA, HostReads
    trainer = Trainer(make_cfg(synthetic_root, tmp_path / "run", "device=cuda", "train.precision=bf16",
                               "model.moe.kernel=auto", "train.steps=4", "train.log_every=4"))
    assert trainer.amp_dtype == torch.bfloat16
    steps = StepLog(trainer.dist)
    steps.add(trainer.train_step())
    with HostReads() as reads:
        for _ in range(2):
            steps.add(trainer.train_step())
    assert reads.outside(HOST_DATA) == {}  # matcher auto: on the device
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps.flush())


def test_device_matching_on_cuda_is_as_cheap_as_scipy():
    from scipy.optimize import linear_sum_assignment
    from moe_vision.tasks.matching import device_assignment
    torch.manual_seed(0)
    cost = torch.rand(6, 9, 40, device="cuda")
    rows = [9, 0, 3, 9, 1, 5]
    for b, (queries, objects) in enumerate(device_assignment(cost, rows)):
        own = cost[b, :rows[b]].double().cpu().numpy()
        r, c = linear_sum_assignment(own)
        assert queries.device.type == "cuda" and sorted(objects.tolist()) == list(range(rows[b]))
        assert own[objects.cpu().numpy(), queries.cpu().numpy()].sum() == pytest.approx(own[r, c].sum(), abs=1e-9)
