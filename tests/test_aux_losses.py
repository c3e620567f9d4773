"""Auxiliary losses against direct computations from their definitions."""
import math

import torch

from moe_vision.moe import AuxLossWeights, MoEMLP, compute_aux_losses, load_balancing_loss
from moe_vision.moe import mutual_information_loss, router_z_loss


def test_mutual_information_matches_definition_on_hand_example():
    # Two tasks, two experts. Task 0 has 2 tokens, task 1 has 1 token.
    p_tok = {0: [[0.9, 0.1], [0.7, 0.3]], 1: [[0.2, 0.8]]}
    prob_sum = torch.tensor([[1.6, 0.4], [0.2, 0.8]])
    tokens = torch.tensor([2.0, 1.0])
    n = 3.0
    P = {(t, e): sum(p[e] for p in p_tok[t]) / n for t in (0, 1) for e in (0, 1)}
    Pt = {t: P[t, 0] + P[t, 1] for t in (0, 1)}
    Pe = {e: P[0, e] + P[1, e] for e in (0, 1)}
    expected = -sum(P[t, e] * math.log(P[t, e] / (Pt[t] * Pe[e])) for t in (0, 1) for e in (0, 1))
    got = mutual_information_loss(prob_sum, tokens)
    assert abs(float(got) - expected) < 1e-6
    assert expected < 0  # MI is positive, the loss its negative


def test_mutual_information_zero_for_single_task_and_for_independence():
    assert abs(float(mutual_information_loss(torch.tensor([[3.0, 1.0]]), torch.tensor([4.0])))) < 1e-6
    # Both tasks use experts identically -> task and expert are independent -> MI = 0.
    ps = torch.tensor([[0.5, 1.5], [1.0, 3.0]])
    assert abs(float(mutual_information_loss(ps, torch.tensor([2.0, 4.0])))) < 1e-6


def test_load_balance_matches_definition():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]])
    idx = torch.tensor([[0], [1], [0], [2]])
    f = [2 / 4, 1 / 4, 1 / 4]
    P = probs.mean(0).tolist()
    expected = 3 * sum(fi * pi for fi, pi in zip(f, P))
    assert abs(float(load_balancing_loss(probs, idx)) - expected) < 1e-6
    uniform = torch.full((6, 3), 1 / 3)
    assert abs(float(load_balancing_loss(uniform, torch.tensor([[0], [1], [2], [0], [1], [2]]))) - 1.0) < 1e-6


def test_z_loss_matches_definition():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    expected = (math.log(math.exp(1) + math.exp(2) + math.exp(3)) ** 2 + math.log(3) ** 2) / 2
    assert abs(float(router_z_loss(logits)) - expected) < 1e-5


def test_compute_aux_losses_combines_tasks_per_layer():
    layer = MoEMLP(8, 16, ["a", "b"], num_experts=4, top_k=2, layer_name="L0")
    with torch.no_grad():
        layer.router.gates["a"].weight.normal_(std=2.0)
        layer.router.gates["b"].weight.normal_(std=2.0)
    xa, xb = torch.randn(6, 8), torch.randn(10, 8)
    _, ra = layer(xa, "a")
    _, rb = layer(xb, "b")
    w = AuxLossWeights(mutual_information=1.0, load_balance=0.5, z_loss=0.25)
    aux = compute_aux_losses([ra, rb], w)
    expected_mi = mutual_information_loss(torch.stack([ra.prob_sum_E, rb.prob_sum_E]), torch.tensor([6.0, 10.0]))
    torch.testing.assert_close(aux.mutual_information, expected_mi)
    torch.testing.assert_close(aux.load_balance, (ra.balance_loss + rb.balance_loss) / 2)
    torch.testing.assert_close(aux.total, aux.mutual_information + 0.5 * aux.load_balance + 0.25 * aux.z_loss)
    aux.total.backward()
    assert layer.router.gates["a"].weight.grad.abs().sum() > 0
    assert set(aux.as_floats()) == {"mutual_information", "load_balance", "z_loss", "total"}


def test_aux_losses_split_by_task_sum_to_the_total():
    from moe_vision.moe import AuxLossWeights, MoEMLP, compute_aux_losses
    from moe_vision.moe.losses import aux_losses_by_task
    torch.manual_seed(0)
    layer = MoEMLP(8, 16, ["a", "b"], num_experts=4, top_k=2)
    routing = [layer(torch.randn(10, 8), t)[1] for t in ("a", "b", "a")]
    for mi in (0.0, 0.05):
        w = AuxLossWeights(mi, 0.01, 0.001)
        per_task, coupled = aux_losses_by_task(routing, w)
        assert set(per_task) == {"a", "b"}
        total = compute_aux_losses(routing, w).total
        torch.testing.assert_close(sum(per_task.values()) + coupled, total)
        assert (float(coupled.detach()) == 0.0) == (mi == 0.0)
