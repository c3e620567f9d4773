"""Long runs that survive: stop signals, checkpoints that cannot be lost, non-finite losses, the
command line's training length."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moe_vision.engine.builders import command_line_schedule
from moe_vision.engine.checkpoint import MANIFEST, damage, latest_checkpoint, step_folders
from moe_vision.engine.distributed import DistContext
from moe_vision.engine.preemption import EXIT_PREEMPTED, StopSignals, TrainingStopped
from moe_vision.engine.trainer import Trainer
from tests.test_engine import make_cfg
from tests.tool_run import run_child, run_tool

ROOT = Path(__file__).resolve().parents[1]


def _losses(run_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (Path(run_dir) / "train_log.jsonl").read_text().splitlines())]


def _cfg(root, out, *extra):
    return make_cfg(root, out, "train.steps=6", "train.ckpt_every=0", "eval.periodic_images=0", "eval.max_batches=1",
                    *extra)


def _signal_at(trainer: Trainer, step: int, signum=signal.SIGTERM, times: int = 1) -> None:
    """Deliver ``signum`` to this process (``times`` times) right after ``step`` trains."""
    original = trainer.train_step

    def train_step():
        out = original()
        if trainer.step == step:
            for _ in range(times):
                os.kill(os.getpid(), signum)
        return out
    trainer.train_step = train_step


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1", "SIGINT"])
def test_each_stop_signal_is_caught_once_and_the_handlers_come_back(name):
    said = []
    with StopSignals(said.append) as signals:
        os.kill(os.getpid(), getattr(signal, name))
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.agreed(DistContext()) == name  # the first one counts
    assert said == [f"{name} received: finishing this step, then writing a checkpoint",
                    "SIGTERM received again: already stopping (the checkpoint is being written)"]
    assert signal.getsignal(getattr(signal, name)) is not signals._handle


def test_a_stop_signal_checkpoints_the_step_and_resume_equals_an_uninterrupted_run(synthetic_root, tmp_path):
    full = tmp_path / "full"
    Trainer(_cfg(synthetic_root, full)).fit()
    part = tmp_path / "part"
    first = Trainer(_cfg(synthetic_root, part))
    _signal_at(first, 3, signal.SIGTERM, times=2)  # a second signal while stopping changes nothing
    with pytest.raises(TrainingStopped, match="stopped on SIGTERM after step 3"):
        first.fit()
    assert latest_checkpoint(part).name == "step_0000003" and damage(latest_checkpoint(part)) is None
    assert [s for s, _ in _losses(part)] == [1, 2, 3]
    torch.manual_seed(1234)  # another process would start from other RNG state
    Trainer({**_cfg(synthetic_root, part), "resume": True}).fit()
    assert _losses(part) == _losses(full)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back


def test_the_tool_exits_with_the_preempted_status_and_the_same_command_continues(synthetic_root, tmp_path):
    out = tmp_path / "run"

    def command(steps: int) -> list[str]:
        return [sys.executable, "tools/train.py", "experiment=synthetic", f"data.root={synthetic_root}",
                "data.synthetic=null", "data.img_size=32", "model=moe_vit_nano", "model.img_size=32",
                "model.moe.num_experts=4", "decoder.dim=32", "decoder.num_queries=14", "decoder.num_layers=1",
                "decoder.num_heads=2", "tasks.cls.batch_size=4", "tasks.det.batch_size=4", "tasks.seg.batch_size=4",
                f"train.steps={steps}", "train.warmup_steps=1", "train.log_every=1", "train.ckpt_every=0",
                "eval.max_batches=1", "eval.periodic_images=0", "device=cpu", f"output_dir={out}", "resume=true"]
    proc = subprocess.Popen(command(40), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "train_log.jsonl"
    deadline = time.time() + 120
    while (not log.is_file() or len(log.read_text().splitlines()) < 2) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    stopped = [line for line in err.splitlines() if line.startswith("moe-vision: stopped on SIGTERM")]
    assert len(stopped) == 1 and "resume=true" in stopped[0]
    step = int(latest_checkpoint(out).name.split("_")[1])
    assert [s for s, _ in _losses(out)] == list(range(1, step + 1))  # every trained step is in the checkpoint
    # The same command line again (a requeued job): it continues and finishes.
    r = subprocess.run(command(step + 2), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [s for s, _ in _losses(out)] == list(range(1, step + 3))
    assert (out / "metrics.json").is_file()


def test_resume_on_an_empty_folder_starts_fresh(synthetic_root, tmp_path):
    trainer = Trainer({**_cfg(synthetic_root, tmp_path / "new", "train.steps=1"), "resume": True})
    trainer.fit()
    assert trainer.step == 1 and latest_checkpoint(tmp_path / "new").name == "step_0000001"


def test_a_damaged_newest_checkpoint_is_passed_over_for_the_previous_one(synthetic_root, tmp_path):
    out = tmp_path / "run"
    Trainer(_cfg(synthetic_root, out, "train.ckpt_every=2", "train.keep_checkpoints=3", "train.steps=4")).fit()
    assert [p.name for p in step_folders(out)] == ["step_0000004", "step_0000002"]
    newest = step_folders(out)[0]
    assert json.loads((newest / MANIFEST).read_text())  # sizes and checksums of every file
    biggest = max((f for f in newest.iterdir() if f.name != MANIFEST), key=lambda f: f.stat().st_size)
    with open(biggest, "r+b") as f:
        f.truncate(biggest.stat().st_size // 2)
    lines = []
    assert latest_checkpoint(out, log=lines.append).name == "step_0000002"
    assert lines == [f"checkpoint {newest} is damaged ({biggest.name} has {biggest.stat().st_size:,} bytes, "
                     f"the manifest says {2 * biggest.stat().st_size:,}); trying the one before it"] or \
        lines[0].startswith(f"checkpoint {newest} is damaged ({biggest.name} has ")
    resumed = Trainer({**_cfg(synthetic_root, out, "train.steps=4"), "resume": True})
    assert resumed.resume() and resumed.step == 2
    # A changed byte of the same size is found by the checksum.
    older = step_folders(out)[1]
    data = bytearray((older / "trainer.pt").read_bytes())
    data[-1] ^= 0xFF
    (older / "trainer.pt").write_bytes(bytes(data))
    assert damage(older) == "trainer.pt does not match its checksum"


def test_keep_checkpoints_keeps_the_newest_n(synthetic_root, tmp_path):
    out = tmp_path / "run"
    Trainer(_cfg(synthetic_root, out, "train.ckpt_every=1", "train.keep_checkpoints=3", "train.steps=5")).fit()
    assert [p.name for p in step_folders(out)] == ["step_0000005", "step_0000004", "step_0000003"]
    with pytest.raises(ValueError, match="train.keep_checkpoints=0: keep at least 1"):
        Trainer(_cfg(synthetic_root, tmp_path / "x", "train.keep_checkpoints=0"))


def test_a_save_killed_midway_leaves_the_previous_checkpoint_usable(synthetic_root, tmp_path, monkeypatch):
    import moe_vision.engine.checkpoint as ckpt
    out = tmp_path / "run"
    trainer = Trainer(_cfg(synthetic_root, out, "train.steps=2"))
    trainer.train_step()
    trainer.save()

    class Killed(BaseException):
        pass

    def dies(*args, **kwargs):  # the process is killed while the checkpoint is being written
        raise Killed
    trainer.train_step()
    monkeypatch.setattr(ckpt, "file_manifest", dies)
    with pytest.raises(Killed):
        trainer.save()
    monkeypatch.undo()
    assert [p.name for p in step_folders(out)] == ["step_0000001"]  # the half-written one is a hidden .tmp
    assert list((out / "checkpoints").glob(".step_0000002.tmp"))
    assert latest_checkpoint(out).name == "step_0000001" and damage(latest_checkpoint(out)) is None


def test_async_checkpoint_is_complete_after_finish(synthetic_root, tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(_cfg(synthetic_root, out, "train.steps=3", "train.ckpt_every=1", "train.async_checkpoint=true"))
    trainer.fit()
    assert [p.name for p in step_folders(out)] == ["step_0000003", "step_0000002"]
    assert all(damage(p) is None for p in step_folders(out))
    assert not list((out / "checkpoints").glob(".*tmp"))


def _nan_at(trainer: Trainer, task: str, steps: set[int]) -> None:
    original = trainer.model.task_loss

    def task_loss(t, out, targets):
        losses = original(t, out, targets)
        if t == task and trainer.step + 1 in steps:
            losses = {**losses, "loss": losses["loss"] * float("nan")}
        return losses
    trainer.model.task_loss = task_loss


def test_nonfinite_skip_makes_no_update_for_that_step_and_counts_it(synthetic_root, tmp_path):
    trainer = Trainer(_cfg(synthetic_root, tmp_path / "skip", "train.nonfinite=skip", "train.steps=3"))
    _nan_at(trainer, "det", {2})
    before = {}

    def snapshot():
        before.update({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    original = trainer.train_step

    def train_step():
        if trainer.step == 1:
            snapshot()
        out = original()
        if trainer.step == 2:  # the skipped step changed no parameter
            assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
        return out
    trainer.train_step = train_step
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "skip" / "train_log.jsonl").read_text().splitlines()]
    assert records[1]["skipped"] and records[1]["nonfinite_tasks"] == ["det"]
    assert "skipped" not in records[2] and trainer.nonfinite_skipped == {"det": 1}


def test_nonfinite_skip_stops_after_max_consecutive(synthetic_root, tmp_path):
    trainer = Trainer(_cfg(synthetic_root, tmp_path / "skip", "train.nonfinite=skip", "train.max_nonfinite=2"))
    _nan_at(trainer, "seg", {2, 3, 4})
    with pytest.raises(FloatingPointError, match=r"2 steps in a row up to step 3 had a non-finite loss \(tasks seg\), "
                                                 r"train.max_nonfinite=2: stopping; no checkpoint was written yet"):
        trainer.fit()


def test_nonfinite_stop_names_the_step_the_tasks_and_the_last_checkpoint(synthetic_root, tmp_path):
    out = tmp_path / "stop"
    trainer = Trainer(_cfg(synthetic_root, out, "train.ckpt_every=2", "train.log_every=5"))
    _nan_at(trainer, "cls", {3})
    with pytest.raises(FloatingPointError) as e:
        trainer.fit()
    assert str(e.value).startswith("step 3: loss is nan (tasks cls); the last checkpoint is ")
    assert "step_0000002 (resume=true continues from it)" in str(e.value)
    assert [p.name for p in step_folders(out)] == ["step_0000002"]  # nothing non-finite was saved


def test_train_steps_on_the_command_line_beats_the_recipes_epochs():
    cfg = {"train": {"steps": 5, "epochs": 30}}
    said = []
    assert command_line_schedule(cfg, ["experiment=real", "train.steps=5"], said.append)["train"]["epochs"] is None
    assert said == ["train.steps=5 from the command line replaces the recipe's train.epochs=30"]
    assert command_line_schedule(cfg, ["experiment=real"], said.append)["train"]["epochs"] == 30
    with pytest.raises(ValueError, match="train.steps=5 and train.epochs=30 are both on the command line"):
        command_line_schedule(cfg, ["train.steps=5", "train.epochs=30"])
    assert command_line_schedule({"train": {"steps": 5, "epochs": None}}, ["train.steps=5"], said.append)
    assert len(said) == 1


def _huge_png(path: Path, side: int = 30000) -> Path:
    """A 1-bit grayscale PNG of side x side pixels, a few hundred kB on disk (written row by row)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    packer, row = zlib.compressobj(9), b"\0" * (1 + side // 8)
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_one_line_or_skipped_with_a_count(tiny_run, synthetic_root, tmp_path):
    bomb = _huge_png(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 2_000_000
    bundle = tiny_run / "experts" / "det"
    r = run_child("predict.py", "--bundle", bundle, bomb, "--out", tmp_path / "p1", timeout=120)  # a real process:
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: image {bomb} has more than 179 megapixels, which PIL refuses to decode (a possible decompression "
        "bomb); the limit is 40 megapixels (--max-megapixels)"]
    big = _huge_png(tmp_path / "big.png", 8000)  # 64 megapixels: under PIL's refusal, over our limit
    r = run_child("predict.py", "--bundle", bundle, big, "--out", tmp_path / "p0", timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: image {big} is 8000x8000 pixels; the limit is 40 megapixels (--max-megapixels)"]
    good = next((synthetic_root / "det" / "val").glob("*.png"))
    r = run_tool("predict.py", "--bundle", bundle, bomb, good, "--out", tmp_path / "p2", "--max-megapixels", "900.5")
    assert r.returncode == 0 and "skipped 1 unreadable" in r.stdout  # a folder goes on without it
    assert f"skipped: image {bomb} has more than 179 megapixels" in r.stderr


def test_bench_data_names_the_experiments_that_exist():
    r = run_child("bench_data.py", "--experiment", "nosuch", timeout=120)  # a real process: one line on stderr
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --experiment 'nosuch' does not exist; the experiments are pretrain_glid, pretrain_hybrid, real, "
        "real_base, synthetic, synthetic_long, synthetic_single_task"]
