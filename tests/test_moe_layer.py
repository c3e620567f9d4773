"""The MoE layer against the naive reference, dispatch/capacity, routers and usage stats."""
import pytest
import torch

from moe_vision.moe import ExpertUsage, MoEAttention, MoEMLP, TaskRouter, TokenDispatcher, resolve_blocks
from moe_vision.moe.reference import NaiveExperts


def _clone_inputs(T, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    return x.clone().requires_grad_(True), x.clone().requires_grad_(True)


@pytest.mark.parametrize("E,K,T", [(4, 1, 7), (8, 2, 33), (16, 4, 64), (3, 3, 5), (8, 2, 1)])
def test_dropless_matches_naive_outputs_and_grads(E, K, T):
    D, H = 12, 20
    layer = MoEMLP(D, H, ["a", "b"], num_experts=E, top_k=K).double()
    # Spread the gates so routing is not degenerate.
    for gate in layer.router.gates.values():
        torch.nn.init.normal_(gate.weight, std=1.0)
    for p in layer.experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ref = NaiveExperts.from_grouped(layer.experts).double()
    x, x_ref = _clone_inputs(T, D)

    y, routing = layer(x, "b")
    w_ref = routing.weights_TK.detach().to(torch.float64)
    y_ref = ref(x_ref, routing.idx_TK, w_ref)
    torch.testing.assert_close(y, y_ref)

    g_out = torch.randn_like(y)
    (y * g_out).sum().backward()
    (y_ref * g_out).sum().backward()
    def grad(p):  # experts that got no token have no gradient in the reference
        return torch.zeros_like(p) if p.grad is None else p.grad

    for e in range(E):
        torch.testing.assert_close(layer.experts.w1.grad[e], grad(ref.fc1[e].weight).t())
        torch.testing.assert_close(layer.experts.b1.grad[e], grad(ref.fc1[e].bias))
        torch.testing.assert_close(layer.experts.w2.grad[e], grad(ref.fc2[e].weight).t())
        torch.testing.assert_close(layer.experts.b2.grad[e], grad(ref.fc2[e].bias))


def test_input_grad_matches_naive_with_fixed_routing():
    E, K, T, D, H = 6, 2, 40, 8, 16
    layer = MoEMLP(D, H, ["a"], num_experts=E, top_k=K).double()
    for p in layer.experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ref = NaiveExperts.from_grouped(layer.experts).double()
    x, x_ref = _clone_inputs(T, D, seed=3)
    with torch.no_grad():
        r = layer.router(x, "a")
    plan = layer.dispatcher.plan(r.idx_TK, r.weights_TK.double())
    y = layer.dispatcher.unpermute(layer.experts(layer.dispatcher.permute(x, plan), plan.counts_E), plan, T)
    y_ref = ref(x_ref, r.idx_TK, r.weights_TK.double())
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize("bias", [True, False])
def test_grouped_linear_operator_passes_gradcheck_and_opcheck(bias):
    from moe_vision.moe.grouped import grouped_linear
    E, I, O = 5, 6, 10
    counts = torch.tensor([3, 0, 7, 1, 4])  # includes an expert with no rows
    args = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in ((15, I), (E, I, O), (E, O))]
    b = args[2] if bias else None
    assert torch.autograd.gradcheck(lambda x, w, bb: grouped_linear(x, counts, w, bb if bias else None),
                                    tuple(args))
    # the operator's registration: fake (shape) implementation, autograd and schema agree with the kernel
    torch.library.opcheck(grouped_linear, (args[0], counts, args[1], b))


def test_capacity_drops_past_capacity_deterministically_and_matches_naive():
    E, K, T, D, H = 4, 2, 24, 8, 12
    layer = MoEMLP(D, H, ["a"], num_experts=E, top_k=K, capacity_factor=0.5).double()
    # Route nearly everything to expert 0 and 1 so capacity bites hard.
    with torch.no_grad():
        layer.router.gates["a"].weight.zero_()
        layer.router.gates["a"].weight[0, 0] = 5.0
        layer.router.gates["a"].weight[1, 0] = 4.0
    x = torch.randn(T, D, dtype=torch.float64).abs()  # feature 0 > 0 -> experts 0 and 1 win
    x.requires_grad_(True)
    y, r = layer(x, "a")
    capacity = layer.dispatcher.capacity(T, K)
    assert capacity == 6  # ceil(0.5 * 24 * 2 / 4)
    assert (r.idx_TK[:, 0] == 0).all() and (r.idx_TK[:, 1] == 1).all()
    # Slot-major ranking: tokens 0..5 keep experts 0 and 1, every later token is dropped entirely.
    assert r.dropped_assignments == 2 * (T - capacity)
    assert r.dropped_tokens == T - capacity
    keep = torch.zeros(T, K, dtype=torch.bool)
    keep[:capacity] = True
    ref = NaiveExperts.from_grouped(layer.experts).double()
    y_ref = ref(x.detach(), r.idx_TK, r.weights_TK.detach().double(), keep)
    torch.testing.assert_close(y.detach(), y_ref)
    assert torch.all(y[capacity:] == 0)  # dropped tokens contribute nothing; the residual carries them
    y2, r2 = layer(x, "a")
    assert torch.equal(y, y2) and r2.dropped_tokens == r.dropped_tokens


def test_capacity_plan_counts_and_partial_drops():
    disp = TokenDispatcher(num_experts=3, capacity_factor=1.0)
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 1], [2, 0]])  # T=5, K=2 -> capacity ceil(10/3)=4
    w = torch.full((5, 2), 0.5)
    plan = disp.plan(idx, w)
    assert plan.capacity == 4
    # expert 0 is wanted by 5 assignments: tokens 0-3 in slot 0 win, token 4's second choice is dropped
    assert plan.counts_E.tolist() == [4, 3, 2]
    assert plan.dropped_assignments == 1 and plan.dropped_tokens == 0
    assert 4 not in plan.token_idx[:4].tolist()


def test_combine_weights_sum_to_one():
    for mode in ("per_task", "shared"):
        router = TaskRouter(16, 8, 3, ["a", "b"], mode=mode)
        torch.nn.init.normal_(router.gate_for("a").weight)
        out = router(torch.randn(50, 16), "a")
        torch.testing.assert_close(out.weights_TK.sum(-1), torch.ones(50))
        assert out.idx_TK.shape == (50, 3)
        assert torch.all(out.idx_TK.sort(-1).values[:, 1:] != out.idx_TK.sort(-1).values[:, :-1])


def test_no_renormalize_keeps_softmax_probs():
    router = TaskRouter(8, 6, 2, ["a"], renormalize=False)
    out = router(torch.randn(10, 8), "a")
    torch.testing.assert_close(out.weights_TK, out.probs_TE.gather(1, out.idx_TK))
    assert torch.all(out.weights_TK.sum(-1) < 1)


def test_noisy_gating_only_in_training():
    router = TaskRouter(8, 6, 2, ["a"], noisy_gating=True)
    x = torch.randn(200, 8)
    router.eval()
    a, b = router(x, "a"), router(x, "a")
    assert torch.equal(a.idx_TK, b.idx_TK)
    router.train()
    flips = sum(not torch.equal(router(x, "a").idx_TK, a.idx_TK) for _ in range(3))
    assert flips > 0


def test_per_task_routers_are_independent():
    layer = MoEMLP(8, 16, ["a", "b"], num_experts=4, top_k=2)
    x = torch.randn(30, 8)
    yb, _ = layer(x, "b")
    ya, ra = layer(x, "a")
    with torch.no_grad():
        layer.router.gates["a"].weight.normal_(std=3.0)
    ya2, ra2 = layer(x, "a")
    yb2, _ = layer(x, "b")
    assert torch.equal(yb, yb2)
    assert not torch.equal(ya, ya2)
    # Adding a task does not disturb existing ones.
    layer.router.add_task("c")
    assert torch.equal(layer(x, "b")[0], yb)
    with pytest.raises(ValueError, match="already has a router"):
        layer.router.add_task("c")


def test_unknown_task_error_names_task_and_known():
    layer = MoEMLP(8, 16, ["cls", "det"], num_experts=4, top_k=2)
    with pytest.raises(KeyError, match=r"unknown task 'depth'.*\['cls', 'det'\]"):
        layer(torch.randn(3, 8), "depth")


def test_bad_layer_options():
    with pytest.raises(ValueError, match="top_k"):
        MoEMLP(8, 16, ["a"], num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="router mode"):
        MoEMLP(8, 16, ["a"], router_mode="global")
    with pytest.raises(ValueError, match="capacity_factor"):
        MoEMLP(8, 16, ["a"], capacity_factor=-1)
    with pytest.raises(ValueError, match="activation"):
        MoEMLP(8, 16, ["a"], activation="swish2")


def test_attention_experts_shapes_grads_and_dense_equivalence():
    B, N, D, heads = 2, 5, 16, 4
    attn = MoEAttention(D, heads, ["a", "b"], num_experts=4, top_k=2)
    x = torch.randn(B, N, D, requires_grad=True)
    y, r = attn(x, "a")
    assert y.shape == (B, N, D) and r.idx_TK.shape == (B * N, 2)
    y.sum().backward()
    assert x.grad is not None and attn.q_experts.weight.grad.abs().sum() > 0
    assert attn.router.gates["a"].weight.grad.abs().sum() > 0
    # With one expert chosen (k=1), the layer is ordinary multi-head attention with that expert's q/o.
    attn1 = MoEAttention(D, 2, ["a"], num_experts=3, top_k=1).double()
    x1 = torch.randn(B, N, D, dtype=torch.float64)
    y1, r1 = attn1(x1, "a")
    e = r1.idx_TK[:, 0]
    q = torch.einsum("td,tdi->ti", x1.reshape(-1, D), attn1.q_experts.weight[e]) + attn1.q_experts.bias[e]
    k, v = attn1.kv(x1).chunk(2, dim=-1)
    h, d = 2, D // 2
    q = q.view(B, N, h, d).transpose(1, 2)
    k, v = (t.reshape(B, N, h, d).transpose(1, 2) for t in (k, v))
    o = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, -1) @ v
    o = o.transpose(1, 2).reshape(B * N, D)
    ref = torch.einsum("ti,tid->td", o, attn1.o_experts.weight[e]) + attn1.o_experts.bias[e]
    torch.testing.assert_close(y1.reshape(-1, D), ref)


def test_expert_usage_counts_and_roundtrip():
    layer = MoEMLP(8, 16, ["a", "b"], num_experts=4, top_k=2, layer_name="blocks.1.mlp")
    usage = ExpertUsage({"blocks.1.mlp": 4}, ["a", "b"])
    _, r = layer(torch.randn(10, 8), "b")
    usage.update([r])
    usage.update([r])
    assert usage.counts.shape == (1, 2, 4)
    assert usage.counts[0, 0].sum() == 0
    assert usage.counts[0, 1].sum() == 2 * 10 * 2
    expected = torch.bincount(r.idx_TK.reshape(-1), minlength=4).double() * 2
    torch.testing.assert_close(usage.counts[0, 1], expected)
    torch.testing.assert_close(usage.frequency()[0, 1].sum(), torch.tensor(1.0, dtype=torch.float64))
    back = ExpertUsage.from_dict(usage.to_dict())
    assert torch.equal(back.counts, usage.counts) and back.layers == usage.layers


def test_resolve_blocks():
    assert resolve_blocks("every_2", 6) == [1, 3, 5]
    assert resolve_blocks("all", 3) == [0, 1, 2]
    assert resolve_blocks("none", 3) == []
    assert resolve_blocks("last_2", 5) == [3, 4]
    assert resolve_blocks([4, 0, 4], 5) == [0, 4]
    with pytest.raises(ValueError, match="out of range"):
        resolve_blocks([7], 4)
    with pytest.raises(ValueError, match="unknown pattern"):
        resolve_blocks("sometimes", 4)
