"""The training loop: heterogeneous task sampling, per-task losses + router aux losses, AdamW with
cosine schedule, clipping, optional bf16 autocast, TensorBoard, periodic evaluation, atomic
checkpoints and exact resume."""
from __future__ import annotations

import contextlib
import copy
import json
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from torch.profiler import record_function
from tqdm import tqdm

from ..progress import progress_bar
from ..data import InfiniteBatches, TaskSampler, collate
from ..models import save_model
from ..moe import ExpertUsage
from ..pretrain.transfer import init_from_pretrained
from . import report
from .balance import GradientBalance
from .expert_budget import ExpertBudget
from .builders import (build_dataset, build_generalist, check_num_classes, drop_missing_optional, resolve_device,
                       resolve_num_classes, run_dir_of, steps_for_epochs)
from .checkpoint import (PendingCheckpoint, latest_checkpoint, load_checkpoint, optimizer_hyperparameters,
                         optimizer_template, optimizer_tensors, restore_optimizer, save_checkpoint, step_folders)
from .compile import compile_model
from .distributed import DistContext, elastic_restart, init_distributed
from .evaluate import chance_metrics, evaluate, fixed_subset
from .optim import LossWeighting, build_optimizer, cosine_with_warmup, set_trainable
from .stage import check_adapter_tensors, check_stage, freeze_pretrained, frozen_unchanged
from .parallel import parallelize, shards_model
from .preemption import StopSignals, TrainingStopped, host_group
from .setup import (autocast_dtype, cap_workers, check_train_config, ensure_synthetic, seed_everything,
                    task_workers)
from .step import MultiTaskStep
from .steplog import NonFiniteLoss, PendingStep, StepLog, write_records

NONFINITE_MODES = ("stop", "skip")


class Trainer:
    """Owns one run: ``Trainer(cfg).fit()`` trains, evaluates and writes the run directory.

    ``model`` replaces building one from ``cfg`` (the surgery tools pass a grown or extracted model
    whose frozen parameters have ``requires_grad=False``; only the others are optimised).
    """

    def __init__(self, cfg: Mapping[str, Any], model: torch.nn.Module | None = None) -> None:
        check_train_config(cfg)
        self.cfg = cfg
        self.tcfg = cfg["train"]
        self.run_dir = run_dir_of(cfg)
        self.device = resolve_device(cfg.get("device", "auto"))
        self.dist: DistContext = init_distributed(self.device, cfg.get("dist") or {})
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.amp_dtype = autocast_dtype(self.tcfg.get("precision", "auto"), self.device)
        if self.dist.is_main:  # one rank generates the benchmark, the others wait for it
            ensure_synthetic(cfg["data"], progress=tqdm.write)
        self.dist.barrier()
        seed_everything(int(cfg["seed"]))
        dropped = []
        if model is None:
            cfg, dropped = drop_missing_optional(cfg)
            self.cfg = cfg
        if dropped and self.dist.is_main:
            tqdm.write(f"left out task(s) {', '.join(dropped)}: their optional data folders do not exist")
        self.tasks = list(cfg["tasks"])
        # The data first: a head's class count left at null is read from it.
        self.train_sets = {t: build_dataset(t, cfg["tasks"][t], cfg["data"], "train", True) for t in self.tasks}
        if model is None:
            cfg = self.cfg = {**cfg, "tasks": {t: dict(tc) for t, tc in cfg["tasks"].items()}}
            resolve_num_classes(cfg["tasks"], self.train_sets)
        self.model = model if model is not None else build_generalist(cfg)
        self.init_report = None
        if model is None and cfg["model"].get("init_from"):  # fine-tuning from a pre-trained run
            self.init_report = init_from_pretrained(self.model, cfg["model"]["init_from"],
                                                    cfg["model"].get("init_routers_from"),
                                                    cfg["model"].get("init_keep") or "all")
        self.stage = self.tcfg.get("stage") or "finetune"
        # (a model handed in by a surgery tool comes with its own frozen parameters)
        check_stage(self.stage, model is not None or self.init_report is not None, self.tcfg.get("trainable", "all"))
        self.stage_info, self.text_report = None, None
        if self.init_report is not None:
            check_adapter_tensors(self.init_report)
            if self.stage == "adapt":
                self.stage_info = freeze_pretrained(self.model, self.init_report)
        if model is None and self.tcfg.get("trainable", "all") != "all":
            set_trainable(self.model, self.tcfg["trainable"])
        self.model = self.model.to(self.device)
        self.model.backbone.grad_checkpointing = bool(self.tcfg.get("grad_checkpointing", False))
        self.compiled = bool(self.tcfg.get("compile")) and compile_model(
            self.model, self.device, self.tcfg.get("compile_mode") or "default",
            self.tcfg.get("compile_backend") or "inductor")
        # Frozen normalisation layers (surgery tools) must not update their running statistics.
        # (Per-task statistics, model.task_norm, are updated only by their own task: not listed.)
        self.frozen_norms = [m for name, m in self.model.named_modules()
                             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and ".per_task." not in name
                             and not any(p.requires_grad for p in m.parameters())]
        max_train = cfg["data"].get("max_train_images")
        if max_train:  # a low-label budget: a fixed random subset of each task's training split
            self.train_sets = {t: fixed_subset(d, int(max_train), int(cfg["seed"])) for t, d in self.train_sets.items()}
        self.val_sets = {t: build_dataset(t, cfg["tasks"][t], cfg["data"], cfg["eval"].get("split", "val"), False)
                         for t in self.tasks}
        for t in self.tasks:
            check_num_classes(t, cfg["tasks"][t], self.train_sets[t])
            names = getattr(self.train_sets[t], "classes", None)
            if names and "class_names" not in self.model.spec(t).options:
                # Stored in the checkpoint's config, so bundles and predict.py can name classes.
                self.model.spec(t).options["class_names"] = list(names)
        if self.model.lv is not None:  # class-text embeddings for LV-Adapters that do not have them yet
            from ..adapters import fill_text_embeddings
            self.text_report = fill_text_embeddings(self.model, self.model.language_config, self.run_dir, tqdm.write)
        # Periodic validation runs on a fixed random subset (the val splits may be sorted by class).
        n_periodic = int(cfg["eval"].get("periodic_images") or 0)
        self.periodic_sets = {t: fixed_subset(d, n_periodic, int(cfg["seed"])) for t, d in self.val_sets.items()}
        steps = steps_for_epochs(self.tcfg, cfg["tasks"], {t: len(d) for t, d in self.train_sets.items()})
        if steps is not None:
            self.tcfg = {**self.tcfg, "steps": steps}
            cfg = self.cfg = {**cfg, "train": self.tcfg}
            if self.dist.is_main:
                tqdm.write(f"train.epochs={self.tcfg['epochs']}: {steps:,} steps")
        sampling = self.tcfg["sampling"]
        self.sampler = TaskSampler({t: len(d) for t, d in self.train_sets.items()}, sampling["strategy"],
                                   float(sampling.get("temperature", 2.0)), int(cfg["seed"]),
                                   int(sampling.get("tasks_per_step", 1)))
        workers, note = cap_workers({"(evaluation)": int(cfg["data"].get("num_workers") or 0),
                                     **{t: task_workers(cfg["data"], t) for t in self.train_sets}})
        if note and self.dist.is_main:
            tqdm.write(note)
        self.workers = workers.pop("(evaluation)")
        # tasks.*.batch_size is the global batch; each rank loads its own disjoint slice of it.
        self.iters = {t: InfiniteBatches(d, int(cfg["tasks"][t]["batch_size"]), collate, int(cfg["seed"]), t,
                                         workers[t], rank=self.dist.rank,
                                         world_size=self.dist.world_size,
                                         prefetch_factor=int(cfg["data"].get("prefetch_factor") or 2),
                                         pin_memory=self.device.type == "cuda")
                      for t, d in self.train_sets.items()}
        self.weighting = LossWeighting({t: float(cfg["tasks"][t].get("loss_weight", 1.0)) for t in self.tasks},
                                       self.tcfg.get("loss_weighting", "fixed")).to(self.device)
        self.step_module = MultiTaskStep(self.model, self.weighting, self.amp_dtype)
        self.balance = GradientBalance(self.model, self.tcfg.get("balance") or "none", int(cfg["seed"]))
        self.budget = ExpertBudget(self.model.backbone.moe_modules(), self.tcfg.get("expert_budget"),
                                   int(self.tcfg["steps"]),
                                   reduce=torch.distributed.all_reduce if self.dist.enabled else None,
                                   rank=self.dist.rank)
        if self.budget.describe() and self.dist.is_main:
            tqdm.write(self.budget.describe())
        self.step_module.split_by_task = self.balance.per_task
        if self.balance.per_task and self.dist.enabled:
            raise ValueError(f"train.balance={self.balance.method} needs each task's gradient on its own, which "
                             "data parallelism would exchange once per task: use it in one process (or none)")
        dist_cfg = cfg.get("dist") or {}
        # With FSDP or expert parallelism no rank holds the whole model: rank 0 keeps an unsharded
        # copy, refreshed from the gathered state, to evaluate and to write plain model files.
        sharded = shards_model(self.dist, dist_cfg)
        self.eval_model = copy.deepcopy(self.model) if sharded and self.dist.is_main else self.model
        self.runner, self.par = parallelize(self.step_module, self.dist, dist_cfg, self.device)
        self.optimizer = build_optimizer(self.model, float(self.tcfg["lr"]), float(self.tcfg["weight_decay"]),
                                         self.tcfg.get("betas", (0.9, 0.999)), list(self.weighting.parameters()),
                                         float(self.tcfg.get("head_lr_mult", 1.0)),
                                         float(self.tcfg.get("layer_decay", 1.0)))
        self.scheduler = cosine_with_warmup(self.optimizer, int(self.tcfg["warmup_steps"]), int(self.tcfg["steps"]),
                                            float(self.tcfg.get("min_lr_ratio", 0.0)))
        self.param_names = {id(p): n for n, p in self.step_module.named_parameters()}
        self.step = 0
        self.nonfinite_mode = self.tcfg.get("nonfinite") or "stop"
        if self.nonfinite_mode not in NONFINITE_MODES:
            raise ValueError(f"train.nonfinite={self.nonfinite_mode!r}; expected one of {list(NONFINITE_MODES)}")
        self.nonfinite_skipped: dict[str, int] = {}
        self.nonfinite_streak = 0
        # Training time survives a resume: the seconds before the checkpoint plus this process's.
        self.seconds_before, self.train_t0 = 0.0, None
        if int(self.tcfg.get("keep_checkpoints", 2)) < 1:
            raise ValueError(f"train.keep_checkpoints={self.tcfg['keep_checkpoints']}: keep at least 1")
        self.async_checkpoint = bool(self.tcfg.get("async_checkpoint", False))
        self.pending_checkpoint: PendingCheckpoint | None = None
        self.host_group = host_group(self.dist)  # small host-side agreements (stop signals, async saves)

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        """What a checkpoint holds besides tensors (identical on every rank)."""
        return {"optimizer_hparams": optimizer_hyperparameters(self.optimizer),
                "scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict(),
                "iters": {t: it.state_dict() for t, it in self.iters.items()},
                "nonfinite": {"skipped": dict(self.nonfinite_skipped), "streak": self.nonfinite_streak},
                "expert_budget": self.budget.state_dict(), "train_seconds": self.train_seconds()}

    def train_seconds(self) -> float:
        """Seconds spent training this run so far, over every process that resumed it."""
        return self.seconds_before + (time.time() - self.train_t0 if self.train_t0 is not None else 0.0)

    def newest_checkpoint(self) -> Path | None:
        """The newest complete, intact checkpoint (a damaged newer one is passed over with one line);
        rank 0 looks, the others take its answer."""
        path = latest_checkpoint(self.run_dir, log=tqdm.write) if self.dist.is_main else None
        return self.dist.broadcast_object(path)

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint, whatever world size and layout wrote it
        (False, and a fresh start, when there is none). The run's logs lose the steps after it."""
        path = self.newest_checkpoint()
        if path is None:
            return False
        model_state = self.par.sharded_state(self.step_module)  # views of the parameters: loaded in place
        optim_state = optimizer_template(path, model_state)
        state = load_checkpoint(path, {**model_state, **optim_state}, self.dist)
        restore_optimizer(self.optimizer, self.param_names, optim_state, state["optimizer_hparams"], self.par.as_local)
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        for t, s in state["iters"].items():
            self.iters[t].load_state_dict(s)
        self.step = int(state["step"])
        nonfinite = state.get("nonfinite") or {}
        self.nonfinite_skipped.update(nonfinite.get("skipped", {}))
        self.nonfinite_streak = int(nonfinite.get("streak", 0))
        self.budget.load_state_dict(state.get("expert_budget") or {})
        self.seconds_before = float(state.get("train_seconds", 0.0))
        if self.dist.is_main:
            for name in ("train_log.jsonl", "val_log.jsonl"):
                report.truncate_log(self.run_dir / name, self.step)
            tqdm.write(f"resumed from {path} (written by {state['world_size']} rank(s)) at step {self.step}")
        return True

    def save(self) -> Path:
        """A checkpoint of the current step (every rank calls this). With ``train.async_checkpoint``
        the tensors are written in the background; the previous background save is finished first."""
        self.finish_checkpoint()
        tensors = {**self.par.sharded_state(self.step_module),
                   **optimizer_tensors(self.optimizer, self.param_names, self.par.as_stored)}
        out = save_checkpoint(self.run_dir, self.step, tensors, self.state(), self.dist,
                              keep=int(self.tcfg.get("keep_checkpoints", 2)), asynchronous=self.async_checkpoint,
                              process_group=self.host_group)
        if isinstance(out, PendingCheckpoint):
            self.pending_checkpoint = out
            return out.final
        return out

    def finish_checkpoint(self) -> None:
        """Wait for a background checkpoint and make it final (every rank calls this)."""
        if self.pending_checkpoint is not None:
            self.pending_checkpoint.finish()
            self.pending_checkpoint = None

    def sync_eval_model(self) -> None:
        """Gather the sharded model into rank 0's unsharded copy (every rank calls this)."""
        if not self.par.sharded:
            return
        full = self.par.full_state(self.step_module)
        if self.dist.is_main:
            self.eval_model.load_state_dict({k[len("model."):]: v for k, v in full.items() if k.startswith("model.")})

    # ------------------------------------------------------------------ one step
    def _train_mode(self) -> None:
        self.model.train()
        for m in self.frozen_norms:
            m.eval()

    def train_step(self) -> PendingStep:
        """One optimizer step. Its figures stay on the device (:class:`PendingStep`): nothing here
        reads the device on the host, except with ``train.nonfinite=skip``, which must know before
        the update whether the loss is finite."""
        self._train_mode()
        tasks = next(self.sampler)
        self.optimizer.zero_grad(set_to_none=True)
        batches = []
        for task in tasks:
            with record_function(f"data/{task}"):
                batches.append((task, *next(self.iters[task])))
        loss, logs, aux, routing, split = self.runner(batches)
        with record_function("backward"):
            self.balance.backward(loss, split)
            self.par.finish_gradients()
        extra = {}
        with record_function("optimizer"):
            clip = float(self.tcfg.get("grad_clip", 0.0))
            grad_norm = self.par.clip_grad_norm(list(self.model.parameters()), clip) if clip > 0 else None
            bad = self.nonfinite_tasks(loss, logs, grad_norm) if self.nonfinite_mode == "skip" else []
            if bad:
                extra = self.skip_step(bad)
            else:
                self.nonfinite_streak = 0
                self.optimizer.step()
            self.scheduler.step()
        self.step += 1
        self.budget.after_step(self.step, [] if extra.get("skipped") else routing)  # (no update: no scores)
        dropped = sum((x.dropped_tokens for x in routing), 0)
        aux_values = {k: v.detach() for k, v in vars(aux).items()}
        return PendingStep(self.step, tasks, self.scheduler.get_last_lr()[0], loss.detach(), logs, aux_values,
                           None if grad_norm is None else grad_norm.detach(), dropped, extra)

    def nonfinite_tasks(self, loss, logs, grad_norm) -> list[str]:
        """``train.nonfinite=skip``: the step's tasks whose loss is not finite (all of them when only
        the total or the gradient norm is); one host read per step."""
        tasks = list(logs)
        values = torch.stack([loss.detach().float(), *(logs[t]["loss"].float() for t in tasks),
                              (grad_norm if grad_norm is not None else loss.new_zeros(())).detach().float()])
        finite = torch.isfinite(values).tolist()
        if all(finite):
            return []
        return [t for t, ok in zip(tasks, finite[1:]) if not ok] or tasks

    def skip_step(self, bad: list[str]) -> dict:
        """No update for this step: counted per task; ``train.max_nonfinite`` in a row stop the run."""
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_streak += 1
        for t in bad:
            self.nonfinite_skipped[t] = self.nonfinite_skipped.get(t, 0) + 1
        limit = int(self.tcfg.get("max_nonfinite", 10))
        if self.dist.is_main:
            tqdm.write(f"step {self.step + 1}: non-finite loss (tasks {', '.join(bad)}): no update "
                       f"({self.nonfinite_streak} in a row; skipped so far {self.nonfinite_skipped})")
        if self.nonfinite_streak >= limit:
            raise FloatingPointError(f"{self.nonfinite_streak} steps in a row up to step {self.step + 1} had a "
                                     f"non-finite loss (tasks {', '.join(bad)}), train.max_nonfinite={limit}: "
                                     f"stopping; {self.last_checkpoint_note()}")
        return {"skipped": True, "nonfinite_tasks": bad}

    def last_checkpoint_note(self) -> str:
        path = step_folders(self.run_dir)
        return (f"the last checkpoint is {path[0]} (resume=true continues from it)" if path
                else "no checkpoint was written yet")

    def flush_log(self, steplog: StepLog, log_file, writer, ema: dict) -> dict | None:
        """Read the pending steps on the host (every rank: a collective under torchrun), write
        them (rank 0) and return the newest record. A non-finite step stops the run here with one
        line naming the step, its tasks and the last checkpoint."""
        try:
            records = steplog.flush()
        except NonFiniteLoss as e:
            raise FloatingPointError(f"{e}; {self.last_checkpoint_note()}; lower train.lr, enable train.grad_clip "
                                     "or set train.nonfinite=skip") from None
        if records and self.dist.is_main:
            write_records(records, log_file, writer, ema)
        return records[-1] if records else None

    # ------------------------------------------------------------------ run
    def fit(self) -> dict:
        """Train to ``train.steps``, evaluate, write the run directory; returns the results. On a stop
        signal: a checkpoint, then :class:`~moe_vision.engine.preemption.TrainingStopped`."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        restart = elastic_restart()
        if self.cfg.get("resume") or restart:
            if restart and not self.cfg.get("resume") and self.dist.is_main:
                tqdm.write(f"torchrun restart {restart}: continuing from the newest complete checkpoint")
            self.resume()
        elif step_folders(self.run_dir):
            raise FileExistsError(f"{self.run_dir} already holds a training run; pass resume=true to continue it "
                                  "or choose another output_dir")
        main = self.dist.is_main  # only rank 0 writes logs, reports, pictures and checkpoints
        if main and self.stage_info is not None:
            tqdm.write(f"adapt stage: {self.stage_info['trainable']:,} of {self.stage_info['total']:,} parameters "
                       f"trainable ({100 * self.stage_info['trainable_fraction']:.1f}%), "
                       f"{len(self.stage_info['snapshot'])} pre-trained tensors frozen")
        if main:
            report.write_json(self.run_dir / "config.json", self.cfg)
            if self.text_report:
                report.write_json(self.run_dir / "lv_text.json", self.text_report)
            upcycled = getattr(self.model.backbone, "upcycle_report", None)
            if upcycled is not None:
                report.write_json(self.run_dir / "upcycle.json", upcycled)
                tqdm.write(f"upcycled from {upcycled['source']}: {len(upcycled['loaded'])} tensors loaded by name, "
                           f"{len(upcycled['upcycled'])} MoE layers from the dense MLPs, {len(upcycled['new'])} new "
                           f"(e.g. {', '.join(upcycled['new'][:3])}), {len(upcycled['ignored'])} ignored "
                           f"(e.g. {', '.join(upcycled['ignored'][:3])}); list in upcycle.json")
            if self.init_report is not None:
                r = self.init_report
                report.write_json(self.run_dir / "init_from.json", r)
                tqdm.write(f"initialised from {r['source']}: {len(r['loaded'])} tensors loaded, "
                           f"{len(r['routers_from'])} router/task-embedding tensors from "
                           f"'{self.cfg['model'].get('init_routers_from')}', {len(r['new'])} new "
                           f"(e.g. {', '.join(r['new'][:3])}), {len(r['ignored'])} ignored "
                           f"(e.g. {', '.join(r['ignored'][:3])})" +
                           (f"; heads of another shape left new: {', '.join(r['heads_reshaped'])}"
                            if r.get("heads_reshaped") else ""))
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(self.run_dir / "tb")) if main else None
        steps = int(self.tcfg["steps"])
        log_every, eval_every = int(self.tcfg.get("log_every", 10)), int(self.tcfg.get("eval_every", 0))
        ckpt_every = int(self.tcfg.get("ckpt_every", 0))
        global_images = sum(int(self.cfg["tasks"][t]["batch_size"]) for t in self.tasks) / max(1, len(self.tasks)) \
            * int(self.tcfg["sampling"].get("tasks_per_step", 1))
        ema: dict[str, float] = {}
        bar = progress_bar(total=steps, initial=self.step, desc="train", dynamic_ncols=True, disable=not main)
        log_path = self.run_dir / "train_log.jsonl"
        t0 = self.train_t0 = time.time()
        first_step = self.step
        steplog = StepLog(self.dist)
        stopped: TrainingStopped | None = None
        with (open(log_path, "a") if main else contextlib.nullcontext()) as log_file, \
                StopSignals(tqdm.write if main else (lambda m: None)) as signals:
            while self.step < steps:
                steplog.add(self.train_step())
                bar.update(1)
                if self.step % log_every == 0 or self.step == steps:
                    rec = self.flush_log(steplog, log_file, writer, ema)
                    if main:  # images per second over all ranks (each loads its slice of the global batch)
                        ips = global_images * (self.step - first_step) / max(time.time() - t0, 1e-9)
                        bar.set_postfix_str(" ".join(f"{t}={v:.3f}" for t, v in ema.items()) +
                                            f" mi={rec['aux']['mutual_information']:.3f}"
                                            f" lb={rec['aux']['load_balance']:.2f}"
                                            f" img/s={ips:.0f} task={','.join(rec['tasks'])}")
                if eval_every and self.step % eval_every == 0 and self.step < steps:
                    self.flush_log(steplog, log_file, writer, ema)
                    self.sync_eval_model()
                    if main:
                        self.periodic_validation(writer)
                    self.dist.barrier()
                if ckpt_every and self.step % ckpt_every == 0 and self.step < steps:
                    self.flush_log(steplog, log_file, writer, ema)  # (nothing non-finite is saved)
                    self.save()
                stop = signals.agreed(self.dist, self.host_group)
                if stop and self.step < steps:
                    self.flush_log(steplog, log_file, writer, ema)
                    stopped = TrainingStopped(self.step, self.save(), stop)
                    self.finish_checkpoint()
                    break
        bar.close()
        for it in self.iters.values():
            it.close()  # the loader workers are not needed for evaluation
        if stopped is not None:
            raise stopped
        results: dict = {"train_seconds": self.train_seconds()}
        unfinished = self.budget.unfinished()
        if unfinished and main:
            results["budget_unfinished"] = unfinished
            tqdm.write("expert budget not reached (no tokens after the narrowing phase): " + "; ".join(
                f"{t} in {len(layers)} layer(s), e.g. {layers[0]}" for t, layers in unfinished.items())
                + "; its exact bundle keeps more experts: start the narrowing earlier or sample the task more")
        self.save()
        self.finish_checkpoint()
        self.sync_eval_model()
        if main:
            save_model(self.eval_model, self.run_dir / "model.safetensors")
            if self.stage_info is not None:
                results["stage"] = self.check_frozen()
            results.update(self.final_evaluation())
            writer.close()
        # No barrier here: the others need not wait (and time out) while rank 0 evaluates the full split.
        return results

    def check_frozen(self) -> dict:
        """After an adapt stage: every frozen tensor bit-identical to its pre-trained value
        (written to ``stage.json``; a difference is a bug and fails the run)."""
        info = self.stage_info
        check = {"stage": self.stage, "trainable_parameters": info["trainable"], "total_parameters": info["total"],
                 "trainable_fraction": info["trainable_fraction"],
                 **frozen_unchanged(self.eval_model, info["snapshot"])}
        report.write_json(self.run_dir / "stage.json", check)
        if not check["identical"]:
            raise RuntimeError(f"adapt stage changed {len(check['changed'])} frozen tensor(s), e.g. {check['changed'][:3]}")
        tqdm.write(f"adapt stage: all {check['frozen_tensors']} frozen tensors bit-identical to the pre-trained ones")
        return check

    def periodic_validation(self, writer) -> dict:
        """Metrics on the fixed validation subsets, logged to TensorBoard and ``val_log.jsonl``."""
        m = evaluate(self.eval_model, self.periodic_sets, int(self.cfg["eval"]["batch_size"]), None, self.device,
                     progress=False, autocast_dtype=self.amp_dtype, num_workers=self.workers)
        self._log_validation(m, subset=True)
        for task, ms in m.items():
            for k, v in ms.items():
                writer.add_scalar(f"val/{task}/{k}", v, self.step)
        tqdm.write(f"step {self.step}: " + "  ".join(
            f"{t} {self.model.spec(t).primary_metric}={ms[self.model.spec(t).primary_metric]:.4f}"
            for t, ms in m.items()))
        return m

    def _log_validation(self, metrics: dict, subset: bool) -> None:
        with open(self.run_dir / "val_log.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, "subset": subset, "metrics": metrics}) + "\n")

    def write_pictures(self) -> None:
        """``curves.png`` from the run's logs and ``predictions.png`` on validation images."""
        from .visualize import plot_curves, plot_predictions
        read = (lambda name: [json.loads(line) for line in (self.run_dir / name).read_text().splitlines()]
                if (self.run_dir / name).is_file() else [])
        plot_curves(read("train_log.jsonl"), read("val_log.jsonl"),
                    {t: self.model.spec(t).primary_metric for t in self.tasks}, self.run_dir / "curves.png")
        pictured = {}
        for task, dataset in self.val_sets.items():
            spec = self.eval_model.spec(task)
            if hasattr(spec, "write_pictures"):  # e.g. masked image modelling: reconstructions.png
                spec.write_pictures(self.eval_model, task, dataset, self.run_dir)
            else:
                pictured[task] = dataset
        if pictured:
            plot_predictions(self.eval_model, pictured, self.run_dir / "predictions.png", device=self.device)

    def final_evaluation(self) -> dict:
        usage = ExpertUsage.of(self.eval_model.backbone, self.tasks)
        metrics = evaluate(self.eval_model, self.val_sets, int(self.cfg["eval"]["batch_size"]),
                           self.cfg["eval"].get("max_batches"), self.device, usage=usage, results_dir=self.run_dir,
                           autocast_dtype=self.amp_dtype, num_workers=self.workers)
        chance = chance_metrics(self.eval_model, self.val_sets)
        report.write_run_reports(self.run_dir, metrics, chance, usage)
        self._log_validation(metrics, subset=False)
        self.write_pictures()
        return {"metrics": metrics, "chance": chance, "usage": usage}
