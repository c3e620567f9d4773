"""One-to-one matching: the device solver (tensor operations only, nothing read back on the host)
finds assignments as cheap as scipy's, and detection trains the same with either matcher."""
import itertools
import json

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from moe_vision.tasks.matching import device_assignment, hungarian_match


def _problems(seed: int, count: int):
    """Batches of random problems: real-valued costs, small integer costs (many ties), images
    without objects, images with as many objects as queries."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        B, Q = int(rng.integers(1, 5)), int(rng.integers(1, 16))
        rows = [int(rng.integers(0, Q + 1)) for _ in range(B)]
        rows[0] = Q if i % 5 == 0 else rows[0]
        shape = (B, max(rows), Q)
        cost = rng.integers(0, 4, shape) if i % 3 == 0 else rng.normal(size=shape)
        yield torch.as_tensor(cost, dtype=torch.float64), rows


def test_device_assignment_is_as_cheap_as_scipy_on_random_and_tied_problems():
    for cost, rows in _problems(0, 200):
        for b, (queries, objects) in enumerate(device_assignment(cost, rows)):
            n = rows[b]
            own = cost[b, :n].numpy()
            r, c = linear_sum_assignment(own)
            assert sorted(objects.tolist()) == list(range(n))  # every object matched once
            assert len(set(queries.tolist())) == n and queries.tolist() == sorted(queries.tolist())
            assert own[objects.numpy(), queries.numpy()].sum() == pytest.approx(own[r, c].sum(), abs=1e-9)


def test_device_assignment_brute_force_and_padding_rows_do_not_matter():
    cost = torch.tensor([[[4.0, 1.0, 3.0, 0.5], [2.0, 0.0, 5.0, 9.0], [3.0, 2.0, 2.0, 9.0]]])  # 3 objects, 4 queries
    queries, objects = device_assignment(cost, [3])[0]
    best = min(sum(cost[0, t, q] for t, q in enumerate(p)) for p in itertools.permutations(range(4), 3))
    assert float(cost[0, objects, queries].sum()) == pytest.approx(float(best))
    # The same first two objects with garbage in the padding row: the optimum of the two.
    padded = cost.clone()
    padded[0, 2] = -1e6
    q2, t2 = device_assignment(padded, [2])[0]
    r, c = linear_sum_assignment(cost[0, :2].numpy())
    assert float(cost[0, t2, q2].sum()) == pytest.approx(float(cost[0, r, c].sum()))


def test_device_assignment_survives_non_finite_costs_and_refuses_too_few_queries():
    cost = torch.tensor([[[float("nan"), 1.0, 2.0], [0.0, float("inf"), 1.0]]])
    queries, objects = device_assignment(cost, [2])[0]
    assert sorted(objects.tolist()) == [0, 1] and len(set(queries.tolist())) == 2
    with pytest.raises(ValueError, match="3 objects but only 2 queries"):
        device_assignment(torch.zeros(1, 3, 2), [3])


def test_device_and_host_matchers_agree_with_hungarian_match():
    for cost, rows in _problems(1, 30):
        for b, (queries, objects) in enumerate(device_assignment(cost, rows)):
            q, t = hungarian_match(cost[b, :rows[b]].T)  # (queries, objects) layout
            own = cost[b]
            assert float(own[objects, queries].sum()) == pytest.approx(float(own[t, q].sum()), abs=1e-9)


def test_the_matcher_setting_chooses_by_device_object_count_and_queries():
    from moe_vision.tasks.det import DetectionTask
    task = DetectionTask("det", 3, matcher="auto", matcher_device_max_objects=4)
    gts = lambda *n: [(torch.zeros(k, dtype=torch.long), torch.zeros(k, 4)) for k in n]  # noqa: E731
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert task.matcher(gts(1, 4), 10, cuda) == "device"
    assert task.matcher(gts(1, 5), 10, cuda) == "scipy"  # past matcher_device_max_objects
    assert task.matcher(gts(1, 4), 10, cpu) == "scipy"  # on the CPU scipy is faster
    task.options["matcher"] = "device"
    assert task.matcher(gts(1, 4), 10, cpu) == "device"
    assert task.matcher(gts(11), 10, cpu) == "scipy"  # more objects than queries: rectangular
    task.options["matcher"] = "hungarian"
    with pytest.raises(ValueError, match=r"tasks.det.matcher='hungarian': expected auto, scipy or device"):
        task.build_head(32)


def test_demo_model_trains_the_same_with_both_matchers(synthetic_root, tmp_path):
    """3 steps of the demo model per matcher (all decoder layers matched, det weighted as the
    demo does): the same losses, so the device matcher changes nothing the demo measured."""
    from moe_vision.engine.trainer import Trainer
    from tests.test_engine import make_cfg
    losses = {}
    for matcher in ("scipy", "device"):
        cfg = make_cfg(synthetic_root, tmp_path / matcher, "model=moe_vit_demo", "model.img_size=32",
                       "train.steps=3", "train.ckpt_every=0", "eval.max_batches=1", "eval.periodic_images=0",
                       "decoder.num_layers=2", f"tasks.det.matcher={matcher}")
        Trainer(cfg).fit()
        records = [json.loads(line) for line in (tmp_path / matcher / "train_log.jsonl").read_text().splitlines()]
        losses[matcher] = [v for r in records
                           for v in (r["loss"], r["task_losses"]["det"]["loss"], r["task_losses"]["det"]["aux_layers"])]
    assert len(losses["scipy"]) == 3 * 3
    assert losses["device"] == pytest.approx(losses["scipy"], abs=1e-5)
