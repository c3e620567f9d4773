"""2-rank tests on CPU (gloo) through torchrun: each scenario in tests/dist_worker.py compares the
distributed result with the single-process one on the concatenated batch."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.tool_run import run_tool

ROOT = Path(__file__).resolve().parents[1]


def run_ranks(scenario: str, tmp_path: Path, timeout: int = 180, ranks: int = 2) -> dict:
    """Run ``tests/dist_worker.py`` scenarios (comma-separated) under torchrun; their merged report."""
    out = tmp_path / f"{scenario.replace(',', '+')}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           str(ROOT / "tests" / "dist_worker.py"), scenario, str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    """Every 2-rank scenario in one torchrun launch (each launch costs two fresh interpreters)."""
    return run_ranks("all_to_all,expert_parallel,aux_losses,stop_agreement,strategies",
                     tmp_path_factory.mktemp("two_ranks"))


def test_all_to_all_uneven_and_zero_splits_forward_and_backward(two_ranks):
    rep = two_ranks
    assert rep["a2a_forward"] == 0.0 and rep["a2a_input_grad"] == 0.0


def test_expert_parallel_layer_equals_one_process_even_when_a_rank_gets_no_tokens(two_ranks):
    rep = two_ranks
    for kernel in ("", "gmm_"):  # the loop and torch._grouped_mm on each rank's slice of experts
        for key in ("ep_output", "ep_input_grad", "ep_router_grad", "ep_expert_grad_w1", "ep_expert_grad_b2",
                    "skewed_ep_output", "skewed_ep_input_grad", "skewed_ep_router_grad"):
            key = key.replace("ep_", f"{kernel}ep_", 1)
            assert rep[key] <= 1e-5, (key, rep[key])
    assert rep["rows_received_rank1"] == 0 and rep["rows_received_rank0"] > 0  # the skew really starves rank 1


def test_mutual_information_and_balance_losses_are_global_over_ranks(two_ranks):
    rep = two_ranks
    assert rep["mi_loss"] <= 1e-5 and rep["balance_loss"] <= 1e-5 and rep["aux_router_grad_mean_over_ranks"] <= 1e-5
    assert rep["local_mi_differs"] == 1.0  # without the reduction the per-rank value would differ


def test_ranks_agree_to_stop_when_only_one_of_them_got_the_signal(two_ranks):
    rep = two_ranks
    assert all(rep[f"rank{r}_{what}"] == 1.0 for r in (0, 1) for what in ("nothing_before", "stops_on_sigusr1"))


def test_ep_traffic_tool_measures_close_to_the_formula():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "tools" / "ep_traffic.py"), "--tokens", "256", "--dim", "32"],
                       cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    row = [line for line in r.stdout.splitlines() if line.strip().startswith("256 |")]
    assert row, r.stdout
    ratio = float(row[0].split("|")[-1])
    assert 0.8 < ratio < 1.2  # random routing is close to uniform; the formula is its expectation
    alone = run_tool("ep_traffic.py")
    assert alone.returncode == 2 and "run under torchrun" in alone.stderr


def test_old_torch_is_refused_for_distributed_work():
    from moe_vision._compat import require_distributed_torch
    with pytest.raises(RuntimeError, match=r"needs torch >= 2\.10; this is torch 2\.8\.0"):
        require_distributed_torch("2.8.0+cpu")
    require_distributed_torch("2.14.1+cu130")


def test_ddp_and_fsdp2_with_and_without_expert_parallelism_equal_one_process(two_ranks):
    """Gradients (steps 1 and 2), global gradient norm and parameters after 2 SGD steps (the second
    clipped), with a task router and head unused in each step."""
    rep = two_ranks
    for tag in ("ddp_ep1", "ddp_ep2", "fsdp_ep1", "fsdp_ep2"):
        for what in ("grad_step1", "grad_step2", "grad_norm", "params_after_2_sgd_steps"):
            assert rep[f"{tag}_{what}"] <= 1e-5, (tag, what, rep[f"{tag}_{what}"])


@pytest.mark.slow
def test_four_ranks_with_expert_replicas_equal_one_process(tmp_path):
    """4 ranks, expert parallel degree 2: each expert lives on two ranks (an (edp, ep) = (2, 2) mesh)."""
    rep = run_ranks("strategies", tmp_path, ranks=4)
    for tag in ("ddp_ep2", "fsdp_ep2"):
        for what in ("grad_step1", "grad_step2", "grad_norm", "params_after_2_sgd_steps"):
            assert rep[f"{tag}_{what}"] <= 1e-5, (tag, what, rep[f"{tag}_{what}"])


TRAIN = ["experiment=synthetic", "data.synthetic=null", "data.img_size=32", "model=moe_vit_nano",
         "model.img_size=32", "model.moe.num_experts=4", "decoder.dim=32", "decoder.num_queries=14",
         "decoder.num_layers=1", "decoder.num_heads=2", "tasks.cls.batch_size=4", "tasks.det.batch_size=4",
         "tasks.seg.batch_size=4", "tasks.cls.transforms.scale=null",  # no random augmentation: comparable runs
         "train.steps=4", "train.warmup_steps=1", "train.log_every=1", "train.ckpt_every=2",
         "train.keep_checkpoints=3", "eval.max_batches=1", "eval.batch_size=8", "eval.periodic_images=0", "device=cpu",
         "train.expert_budget.experts=null"]


def _train(tmp_path, root, out, ranks: int, *extra) -> subprocess.CompletedProcess:
    """tools/train.py on the small generalist: under torchrun with ``ranks`` > 1, else in this process."""
    args = [*TRAIN, f"data.root={root}", f"output_dir={out}", *extra]
    if ranks == 1:
        return run_tool("train.py", *args)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(ranks), str(ROOT / "tools" / "train.py"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "train_log.jsonl").read_text().splitlines())}


def _same_losses(run: Path, reference: Path, steps: list[int]) -> None:
    got, want = _losses(run), _losses(reference)
    assert sorted(got) == steps
    for s in steps:
        assert got[s] == pytest.approx(want[s], rel=1e-4), (run.name, s, want[s], got[s])


def _resume_from_step_2(src: Path, dst: Path, synthetic_root: Path, ranks: int, *extra) -> None:
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / "step_0000002", dst / "checkpoints" / "step_0000002")
    (dst / "checkpoints" / "latest").write_text("step_0000002")
    r = _train(dst.parent, synthetic_root, dst, ranks, "resume=true", *extra)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    _same_losses(dst, src, [3, 4])


@pytest.mark.slow  # (40 s: three torchrun launches)
def test_two_rank_training_matches_one_process_and_resumes_across_world_sizes(synthetic_root, tmp_path):
    """FSDP2 with expert parallelism over the 2 ranks against one process; its checkpoint resumes in
    one process and the one-process checkpoint on 2 ranks; its model goes through extraction and
    predict. (DDP with expert parallelism, and add_task under torchrun: the slow test below.)"""
    one, fsdp_ep = tmp_path / "one", tmp_path / "fsdp_ep"
    budget = ["train.expert_budget.experts=2", "train.expert_budget.start=0.25", "train.expert_budget.end=0.5",
              "train.expert_budget.every=1"]  # every task narrowed to 2 of 4 experts at step 2
    for out, ranks, extra in ((one, 1, budget), (fsdp_ep, 2, [*budget, "dist.strategy=fsdp", "dist.expert_parallel=2"])):
        r = _train(tmp_path, synthetic_root, out, ranks, *extra)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    # Same global batch, same loss: only the conv stem's BatchNorm statistics are per rank.
    _same_losses(fsdp_ep, one, [1, 2, 3, 4])
    from safetensors.torch import load_file
    masks = [{k: v for k, v in load_file(str(run / "model.safetensors")).items() if ".allowed." in k} for run in (one, fsdp_ep)]
    assert masks[0] and all(int(v.sum()) == 2 for v in masks[0].values())  # the ranks agreed on one process's masks
    assert masks[0].keys() == masks[1].keys() and all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
    assert (fsdp_ep / "model.safetensors").is_file() and (fsdp_ep / "metrics.json").is_file()
    ckpt = fsdp_ep / "checkpoints" / "step_0000002"
    assert (ckpt / "rng_rank1.pt").is_file() and len(list(ckpt.glob("*.distcp"))) == 2  # each rank wrote its shard
    # The plain model file of a sharded, expert-parallel run goes through the surgery tools unchanged.
    r = run_tool("extract_experts.py", "--task", "det", "--checkpoint", fsdp_ep, "--out", tmp_path / "det",
                 "--data-root", synthetic_root, "--latency-calls", 4)
    assert r.returncode == 0 and "bit-identical" in r.stdout, r.stderr[-2000:]
    image = next((synthetic_root / "det" / "val").rglob("*.png"))
    r = run_tool("predict.py", "--bundle", tmp_path / "det", "--out", tmp_path / "pred", image)
    assert r.returncode == 0 and any((tmp_path / "pred").iterdir()), r.stderr[-2000:]
    # Step-2 checkpoints resume at the other world size and layout: steps 3-4 continue alike.
    _resume_from_step_2(fsdp_ep, tmp_path / "fsdp_ep_on_1", synthetic_root, 1, *budget)
    _resume_from_step_2(one, tmp_path / "one_on_2", synthetic_root, 2, *budget, "dist.strategy=fsdp",
                        "dist.expert_parallel=2")


@pytest.mark.slow
def test_ddp_with_expert_parallelism_trains_like_one_process_and_add_task_runs_data_parallel(synthetic_root, tmp_path):
    one, ddp_ep = tmp_path / "one", tmp_path / "ddp_ep"
    for out, ranks, extra in ((one, 1, []), (ddp_ep, 2, ["dist.expert_parallel=2"])):
        r = _train(tmp_path, synthetic_root, out, ranks, *extra)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    _same_losses(ddp_ep, one, [1, 2, 3, 4])
    assert len(list((ddp_ep / "checkpoints" / "step_0000002").glob("*.distcp"))) == 2
    _resume_from_step_2(ddp_ep, tmp_path / "ddp_ep_on_1", synthetic_root, 1)
    # add_task runs data parallel too; the old tasks stay bit-identical.
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "tools" / "add_task.py"), "--checkpoint", str(ddp_ep), "--task", "depth",
                        "--data", str(synthetic_root / "depth"), "--new-experts", "1", "--steps", "2",
                        "--out", str(tmp_path / "grown")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("old tasks' outputs bit-identical") == 1  # only rank 0 reports


def _rank_pids(marker: str, var: str = "LOCAL_RANK") -> dict[int, int]:
    """``var`` (LOCAL_RANK or RANK) -> pid of the training processes whose command line contains
    ``marker``."""
    pids = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in cmd and "tools/train.py" in cmd and "torch.distributed.run" not in cmd:
            for item in env:
                if item.startswith(var.encode() + b"="):
                    pids[int(item.split(b"=")[1])] = int(proc.name)
    return pids


def _torchrun_two_ranks(synthetic_root, out: Path, *overrides, launcher_args=()) -> subprocess.Popen:
    """tools/train.py under ``torchrun --nproc_per_node 2`` in its own session (killable as a group)."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             *launcher_args, str(ROOT / "tools" / "train.py"), *TRAIN, *overrides,
                             f"data.root={synthetic_root}", f"output_dir={out}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)


def _kill_rank_1_after_the_first_checkpoint(proc: subprocess.Popen, out: Path) -> None:
    """Wait (at most 120 s) for ``out``'s first complete checkpoint, then SIGKILL rank 1."""
    deadline = time.time() + 120
    while not (out / "checkpoints" / "latest").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    pids = _rank_pids(str(out))
    assert 1 in pids, "rank 1 not found"
    os.kill(pids[1], signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc to find rank 1")
def test_a_rank_that_dies_ends_the_run_and_leaves_the_last_checkpoint_intact(synthetic_root, tmp_path):
    out = tmp_path / "dies"
    proc = _torchrun_two_ranks(synthetic_root, out, "train.steps=100000", "train.ckpt_every=3", "dist.timeout_s=30")
    try:
        _kill_rank_1_after_the_first_checkpoint(proc, out)
        killed = time.time()
        _, err = proc.communicate(timeout=90)
        assert proc.returncode != 0 and time.time() - killed < 60
        assert "rank" in err and "FAILED" in err  # torchrun names the failed rank
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # The last complete checkpoint loads and training resumes from it in one process.
    from moe_vision.engine.checkpoint import latest_checkpoint
    latest = latest_checkpoint(out)
    step = int(latest.name.split("_")[1])
    r = _train(tmp_path, synthetic_root, out, 1, "resume=true", f"train.steps={step + 1}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _losses(out)[step + 1] > 0


def test_each_torchrun_restart_round_gets_its_own_store_keys(monkeypatch):
    """torchrun's agent hands every restarted round the same store; the previous round's keys
    (a dead rank's gloo address) must not be visible to the next round on one node."""
    import datetime
    import torch.distributed as dist
    from moe_vision.engine.distributed import restart_round_store, shared_store_restart_notice
    timeout = datetime.timedelta(seconds=10)
    server = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timeout, wait_for_workers=False)
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(server.port), "WORLD_SIZE": "2",
                 "GROUP_WORLD_SIZE": "1", "TORCHELASTIC_MAX_RESTARTS": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert restart_round_store(timeout) is None  # plain torchrun / env://: torch's own setup
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    first = restart_round_store(timeout)
    first.set("rank_1_address", "dead")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    second = restart_round_store(timeout)
    assert not second.check(["rank_1_address"]) and first.check(["rank_1_address"])
    assert shared_store_restart_notice() is None
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")  # several nodes: restart counts are per agent
    assert restart_round_store(timeout) is None
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in shared_store_restart_notice()
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    assert shared_store_restart_notice() is None


@pytest.mark.slow  # (26 s: an elastic torchrun with a restart)
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc to find rank 1")
def test_torchrun_restarts_after_a_killed_rank_and_ends_with_the_uninterrupted_losses(synthetic_root, tmp_path):
    """``torchrun --max-restarts``: rank 1 is SIGKILLed after the first checkpoint; torchrun restarts
    both ranks, they continue from the newest complete checkpoint by themselves, and every step's
    loss equals the one-process run's (the log keeps each step once)."""
    steps = ["train.steps=9", "train.ckpt_every=3"]
    one = tmp_path / "one"
    r = _train(tmp_path, synthetic_root, one, 1, *steps)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "elastic"
    proc = _torchrun_two_ranks(synthetic_root, out, *steps, launcher_args=("--max-restarts", "1"))
    try:
        _kill_rank_1_after_the_first_checkpoint(proc, out)
        try:
            stdout, err = proc.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, err = proc.communicate()
            pytest.fail("torchrun did not finish within 150 s of the kill:\n" + (stdout + err)[-4000:])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and every rank it started
    assert proc.returncode == 0, err[-3000:]
    assert "continuing from the newest complete checkpoint" in stdout + err
    expected, got = _losses(one), _losses(out)
    assert sorted(got) == list(range(1, 10))
    lines = (out / "train_log.jsonl").read_text().splitlines()
    assert len(lines) == 9  # the steps after the checkpoint that were trained twice are logged once
    for s in expected:
        assert got[s] == pytest.approx(expected[s], rel=1e-4), (s, expected[s], got[s])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc to find rank 1")
def test_two_node_torchrun_restart_with_a_store_per_round(synthetic_root, tmp_path):
    """Two torchrun agents on this machine (``--nnodes 2``, one rank each, c10d rendezvous) with
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, as docs/resilience.md says for several nodes: rank 1
    is SIGKILLed after the first checkpoint, both agents restart, and the run ends like the
    uninterrupted one (rank 0 hosts each round's store: its exit waits for the other rank)."""
    from moe_vision.bench.serve_load import free_port
    steps = ["train.steps=9", "train.ckpt_every=3"]
    one = tmp_path / "one"
    assert _train(tmp_path, synthetic_root, one, 1, *steps).returncode == 0
    port = free_port()
    out = tmp_path / "two_nodes"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two",
                                "--max-restarts", "1", str(ROOT / "tools" / "train.py"), *TRAIN, *steps,
                                f"data.root={synthetic_root}", f"output_dir={out}"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True) for _ in range(2)]
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints" / "latest").is_file() and time.time() < deadline:
            time.sleep(0.1)
        pids = _rank_pids(str(out), "RANK")
        assert 1 in pids, "rank 1 not found"
        os.kill(pids[1], signal.SIGKILL)
        outputs = [a.communicate(timeout=150)[0] for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                os.killpg(a.pid, signal.SIGKILL)
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    expected, got = _losses(one), _losses(out)
    assert sorted(got) == list(range(1, 10))
    for s in expected:
        assert got[s] == pytest.approx(expected[s], rel=1e-4), (s, expected[s], got[s])
