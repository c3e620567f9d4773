"""GPU-ready MoE: the layer and a whole generalist compile into one graph (fullgraph=True fails on
any host read or data-dependent shape), compiled equals eager, the sync-free dispatch equals the
reference on skewed routing, and train.compile falls back to eager without a compiler."""
import pytest
import torch

from moe_vision.moe import MoEAttention, MoEMLP
from moe_vision.moe.reference import NaiveExperts

D, H, T = 16, 32, 40


def _layer(router_mode="per_task", capacity_factor=0.0):
    torch.manual_seed(0)
    layer = MoEMLP(D, H, ["a", "b"], num_experts=4, top_k=2, router_mode=router_mode,
                   capacity_factor=capacity_factor)
    for gate in layer.router.gates.values():
        torch.nn.init.normal_(gate.weight, std=1.0)
    return layer


def _run(module, x, task="b"):
    y, r = module(x, task)
    return y, r.weights_TK, r.balance_loss, r.z_loss


def _compare(eager_module, compiled, x, atol=1e-5):
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ye, yc = _run(eager_module, xe), _run(compiled, xc)
    for a, b in zip(ye, yc):
        torch.testing.assert_close(b, a, atol=atol, rtol=atol)
    g = torch.randn_like(ye[0])
    ((ye[0] * g).sum() + ye[2]).backward()
    ((yc[0] * g).sum() + yc[2]).backward()
    torch.testing.assert_close(xc.grad, xe.grad, atol=atol, rtol=atol)


@pytest.mark.parametrize("router_mode,capacity_factor", [("per_task", 0.0), ("shared", 0.0), ("per_task", 1.0)])
def test_moe_layer_compiles_fullgraph_and_equals_eager(router_mode, capacity_factor):
    torch._dynamo.reset()
    layer = _layer(router_mode, capacity_factor)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # dynamo + autograd tracing
    _compare(layer, compiled, torch.randn(T, D))


@pytest.mark.slow  # the C++ compile of inductor's CPU backend: ~25 s on 2 cores with a cold cache
def test_moe_layer_inductor_compile_equals_eager():
    torch._dynamo.reset()
    layer = _layer()
    _compare(layer, torch.compile(layer, fullgraph=True), torch.randn(T, D))  # the real compiler (C++ on CPU)
    grads = [p.grad.clone() for p in layer.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_attention_experts_compile_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    attn = MoEAttention(D, 4, ["a", "b"], num_experts=4, top_k=2)
    x = torch.randn(2, 10, D)
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, "a")[0], attn(x, "a")[0], atol=1e-5, rtol=1e-5)


HOST_READS = {"item", "tolist", "cpu", "numpy", "nonzero", "_local_scalar_dense", "masked_select"}


def host_reads(module, *args) -> set[str]:
    """The operations in ``module``'s forward that read tensors on the host or give data-dependent
    shapes, from the graph torch._dynamo captures with fullgraph=True (any graph break raises)."""
    found: set[str] = set()

    def inspect(gm, example_inputs):
        for node in gm.graph.nodes:
            name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
            moves_to_host = name == "to" and any(str(a) == "cpu" for a in (*node.args[1:], *node.kwargs.values()))
            if name in HOST_READS or moves_to_host or (node.op == "call_function" and name == "tensor"):
                found.add(name)
        return gm.forward

    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_scalar_outputs=False, capture_dynamic_output_shape_ops=False):
        torch.compile(module, fullgraph=True, backend=inspect)(*args)
    return found


def test_moe_forwards_read_nothing_on_the_host():
    for module, args in [(_layer(), (torch.randn(T, D), "a")), (_layer("shared"), (torch.randn(T, D), "b")),
                         (_layer(capacity_factor=1.0), (torch.randn(T, D), "a")),
                         (MoEAttention(D, 4, ["a"], num_experts=4, top_k=2), (torch.randn(2, 10, D), "a"))]:
        assert host_reads(module, *args) == set(), type(module).__name__


def test_the_guard_catches_each_kind_of_host_read():
    class Reading(MoEMLP):
        def __init__(self, read):
            super().__init__(D, H, ["a"], num_experts=4, top_k=2)
            self.read = read

        def forward(self, x, task):
            y, r = super().forward(x, task)
            return self.read(y, r), r

    reads = {"item": lambda y, r: y * r.idx_TK.max().item(),
             "tolist": lambda y, r: y * sum(r.idx_TK[:3, 0].tolist()),
             "cpu": lambda y, r: y * r.weights_TK.cpu().sum(),
             "nonzero": lambda y, r: y[r.idx_TK[:, 0].nonzero()[:, 0]]}
    for name, read in reads.items():
        try:
            found = host_reads(Reading(read), torch.randn(T, D), "a")
        except Exception:  # a graph break under fullgraph=True: caught as well
            continue
        assert found, f"{name} went unnoticed"


def test_sync_free_dispatch_equals_the_reference_on_skewed_routing():
    """One expert takes every token's first choice and another none; dropless and with capacity,
    outputs and gradients equal the per-expert reference loop to 1e-6 in fp32."""
    for capacity_factor in (0.0, 0.75):
        torch.manual_seed(0)
        layer = MoEMLP(D, H, ["a"], num_experts=4, top_k=2, capacity_factor=capacity_factor)
        with torch.no_grad():
            gate = layer.router.gates["a"].weight
            gate.zero_()
            gate[0, 0], gate[1, 1] = 8.0, 0.5  # expert 0 first for all, expert 1 or 2 second, 3 never
        x = torch.randn(T, D)
        x[:, 0] = x[:, 0].abs() + 1
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y, r = layer(x1, "a")
        assert (r.idx_TK[:, 0] == 0).all() and not (r.idx_TK == 3).any()
        keep = None
        if capacity_factor:
            cap = layer.dispatcher.capacity(T, 2)
            keep = torch.zeros(T, 2, dtype=torch.bool)
            keep[:cap, 0] = True  # slot-major: the first `cap` first choices keep expert 0
            for e in (1, 2):  # second choices: the first `cap` of each expert
                rows = (r.idx_TK[:, 1] == e).nonzero()[:cap, 0]
                keep[rows, 1] = True
            assert int(r.dropped_assignments) == int((~keep).sum()) > 0
        ref = NaiveExperts.from_grouped(layer.experts)
        r2 = layer.router(x2, "a")  # the same routing, with its gradient path
        y_ref = ref(x2, r2.idx_TK, r2.weights_TK, keep)
        torch.testing.assert_close(y.detach(), y_ref.detach(), atol=1e-6, rtol=1e-6)
        g = torch.randn_like(y)
        (y * g).sum().backward(inputs=[x1])
        (y_ref * g).sum().backward(inputs=[x2])
        torch.testing.assert_close(x1.grad, x2.grad, atol=1e-6, rtol=1e-6)


def test_nano_generalist_forward_and_backward_compile_fullgraph():
    from moe_vision.engine.builders import build_generalist
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_generalist({"model": {"name": "moe_vit_nano_patch8", "img_size": 32, "moe": {"num_experts": 4}},
                              "tasks": {"cls": {"type": "cls", "num_classes": 5}, "det": {"type": "det", "num_classes": 3},
                                        "seg": {"type": "seg", "num_classes": 4}, "depth": {"type": "depth"}},
                              "decoder": {"dim": 32, "num_queries": 6, "num_layers": 2, "num_heads": 2}}).eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32)
    keys = {"det": "boxes", "seg": "masks"}  # (cls and depth read the same decoder outputs more simply)
    for task, key in keys.items():
        xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ye, yc = model(xe, task)[key], compiled(xc, task)[key]
        torch.testing.assert_close(yc, ye, atol=1e-5, rtol=1e-5)
        ye.square().mean().backward()
        yc.square().mean().backward()
        torch.testing.assert_close(xc.grad, xe.grad, atol=1e-5, rtol=1e-5)


def _losses(run_dir):
    import json
    return [json.loads(line)["loss"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow  # ~1 min: two runs with evaluation
def test_train_compile_trains_like_eager(synthetic_root, tmp_path):
    from moe_vision.engine.trainer import Trainer
    from tests.test_engine import make_cfg
    overrides = ("train.steps=2", "train.ckpt_every=0", "eval.max_batches=1", "eval.periodic_images=0")
    Trainer(make_cfg(synthetic_root, tmp_path / "eager", *overrides)).fit()
    torch._dynamo.reset()
    trainer = Trainer(make_cfg(synthetic_root, tmp_path / "compiled", *overrides, "train.compile=true",
                               "train.compile_backend=aot_eager"))
    assert trainer.compiled
    trainer.fit()
    for a, b in zip(_losses(tmp_path / "compiled"), _losses(tmp_path / "eager")):
        assert a == pytest.approx(b, rel=1e-4)


def test_train_compile_without_a_working_compiler_falls_back_to_eager(synthetic_root, tmp_path, monkeypatch):
    from torch._inductor import config as inductor_config
    from moe_vision.engine.trainer import Trainer
    from tests.test_engine import make_cfg
    torch._dynamo.reset()
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))  # no C++ toolchain
    with pytest.warns(UserWarning, match=r"train.compile=true: torch.compile \(inductor\) does not work on cpu here"):
        trainer = Trainer(make_cfg(synthetic_root, tmp_path / "run", "train.steps=1", "train.compile=true",
                                   "eval.max_batches=1"))
    assert not trainer.compiled
    trainer.fit()
    assert (tmp_path / "run" / "metrics.json").is_file()
