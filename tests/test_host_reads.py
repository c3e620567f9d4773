"""A training loop that never waits on the host between log steps: during the steps between two
log steps of the demo model, nothing reads a computed tensor on the host (``.item()``,
``float()``, ``int()``, ``bool()``, ``.tolist()``, ``.cpu()``, ``.numpy()``), eager and compiled.

Reads of data that is on the host by construction are allowed where they happen: the data
pipeline's augmentation parameters, the batch's image sizes, AdamW's step counters (kept on the
CPU by torch), the segmentation labels counted before they go to the device. Detection's
one-to-one matching runs on the device (``tasks.det.matcher=device``, what ``auto`` picks on CUDA);
with ``scipy`` it copies the cost matrices of all decoder layers to the host once per det loss.
"""
import collections
import traceback
from pathlib import Path

import pytest
import torch

from moe_vision.engine.steplog import StepLog
from moe_vision.engine.trainer import Trainer
from tests.test_engine import make_cfg

READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")
HOST_DATA = {  # (file, function): reads of data that lives on the host
    ("_geometry.py", "make_params"),  # torchvision's augmentation parameters
    ("sampler.py", "batch_keys"),  # the data order
    ("generalist.py", "frame_inputs"),  # the batch's image sizes (from the targets)
    ("optimizer.py", "_get_value"),  # AdamW's step counter, a CPU tensor
    ("seg.py", "classwise_loss"),  # label counts, taken before the labels go to the device
    ("seg.py", "check_labels"),
}


class HostReads:
    """Counts the calls of the read methods on tensors, by (method, file, function)."""

    def __init__(self):
        self.counts = collections.Counter()
        self.original = {name: getattr(torch.Tensor, name) for name in READS}

    def __enter__(self):
        for name, method in self.original.items():
            setattr(torch.Tensor, name, self._counting(name, method))
        return self

    def __exit__(self, *exc):
        for name, method in self.original.items():
            setattr(torch.Tensor, name, method)

    def _counting(self, name, method):
        def counted(tensor, *args, **kwargs):
            frame = traceback.extract_stack(limit=2)[0]
            self.counts[(name, Path(frame.filename).name, frame.name)] += 1
            return method(tensor, *args, **kwargs)
        return counted

    def outside(self, allowed) -> dict:
        return {k: v for k, v in self.counts.items() if (k[1], k[2]) not in allowed}


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
def test_no_host_read_between_log_steps_of_the_demo_model(synthetic_root, tmp_path, compiled):
    extra = ["train.compile=true", "train.compile_backend=aot_eager"] if compiled else []
    trainer = Trainer(make_cfg(synthetic_root, tmp_path / "run", "model=moe_vit_demo", "model.img_size=32",
                               "model.moe.kernel=grouped_mm", "tasks.det.matcher=device", "decoder.num_layers=2",
                               "train.steps=6", "train.log_every=3", *extra))
    steps = StepLog(trainer.dist)
    steps.add(trainer.train_step())  # the first step compiles
    steps.flush()
    with HostReads() as reads:
        for _ in range(2):
            steps.add(trainer.train_step())
    assert reads.outside(HOST_DATA) == {}
    assert reads.counts  # (the counter does see the reads of host data)
    with HostReads() as reads:
        records = steps.flush()  # the log step reads everything at once
    assert [r["step"] for r in records] == [2, 3] and reads.counts[("tolist", "steplog.py", "flush")] == 1


def test_the_counter_catches_a_host_read_in_the_step(synthetic_root, tmp_path):
    trainer = Trainer(make_cfg(synthetic_root, tmp_path / "run", "train.steps=3"))
    original = trainer.runner

    def reading_runner(batches):
        out = original(batches)
        float(out[0].detach())  # what the loop used to do every step
        return out
    trainer.runner = reading_runner
    with HostReads() as reads:
        trainer.train_step()
    assert ("__float__", "test_host_reads.py", "reading_runner") in reads.outside(HOST_DATA)


def test_the_scipy_matcher_is_one_copy_per_det_loss(synthetic_root, tmp_path):
    """``tasks.det.matcher=scipy``: one copy of all decoder layers' costs per det loss."""
    trainer = Trainer(make_cfg(synthetic_root, tmp_path / "run", "tasks.det.matcher=scipy", "decoder.num_layers=2",
                               "train.steps=3", "train.log_every=3"))
    trainer.train_step()
    with HostReads() as reads:
        trainer.train_step()
    # (scipy's per-image solves then read that host copy: matching.py's .cpu()/.numpy() do not copy)
    assert {k: v for k, v in reads.outside(HOST_DATA).items() if k[1] == "det.py"} == {("cpu", "det.py", "match"): 1}
