"""The fine-tuning loop: one optimizer step = `accum` micro-batches, DDP-aware, AMP on CUDA, exact resume.

Progress is a function of the optimizer step alone: the epoch and the position inside it follow from it (the
sampler can start mid-epoch, augmentations are seeded per sample), and every rank's random states are saved, so
an interrupted run resumed from `last.pt` ends with the same weights as an uninterrupted one. What `last.pt` holds,
and which checkpoint a run may continue from, is `resume.py`'s business.
"""

from __future__ import annotations

import inspect
import math
import random
import time
import warnings
from collections import defaultdict
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import ConfigError, DataError, TrainingError
from ..measure.cost import ComputeModel
from ..nn.recorder import find_config as config_of
from .checkpoint import check_output_dir, load_checkpoint, remove_stale_temps, save_checkpoint
from .data import DataBundle, default_workers, make_loader
from .datacheck import batches, fingerprint
from .distributed import DistInfo, all_reduce_sum, barrier
from .losses import LossOutput, LossWeights, SparsificationLoss, hook_teacher
from .metrics import confusion_matrix, segmentation_scores
from .optim import build_optimizer, original_parameter_names, param_groups, warmup_cosine
from .ratios import LearnedKeepRatios, budget_penalty
from .recipe import Recipe
from .resume import check_checkpoint, find_resume, last_good_hint, restore_state, save_state, stored_result
from .runlog import MetricsWriter, ProgressReporter

__all__ = ["Trainer", "config_of"]


def _selectors(model: nn.Module) -> list[nn.Module]:
    from ..nn.recorder import selectors

    return selectors(model)


def _describe(scores: dict[str, float]) -> str:
    names = {"top1": "top-1", "miou": "mIoU", "pixel_acc": "pixel accuracy", "map": "mAP", "map_50": "mAP@.5"}
    return ", ".join(f"{names.get(k, k)} {v:.2f}%" for k, v in scores.items())


def _state(model: nn.Module):
    from ..state import sparsity_state

    return sparsity_state(model)


class Trainer:
    """Fine-tune a sparsified student against its frozen teacher (or train a dense model when not sparsified).

    Args:
        recipe: the resolved recipe.
        student: a result of `tokenprune.sparsify`, or a plain model (trained with cross-entropy only).
        teacher: the frozen original model, or ``None`` (then the KL and distillation terms are off).
        data: training and validation datasets.
        info: this process's place in the job (see `init_distributed`).
    """

    def __init__(
        self, recipe: Recipe, student: nn.Module, teacher: nn.Module | None, data: DataBundle, info: DistInfo
    ) -> None:
        self.recipe, self.info, self.device = recipe, info, info.device
        self.out = Path(recipe.run.output_dir)
        self.student = student.to(self.device)
        self.teacher = teacher.to(self.device).eval().requires_grad_(False) if teacher is not None else None
        self.config = config_of(student)
        self.sparsified = self.config is not None
        self.task, self.num_classes, self.ignore_index = recipe.task, data.num_classes, data.ignore_index
        if data.task != recipe.task:
            raise ConfigError(
                f"the recipe's task is {recipe.task!r} but data.source={recipe.data.source!r} gives {data.task} "
                f"samples; set task: {data.task} or use a {recipe.task} data source."
            )
        self.detection = recipe.task == "detection"
        if self.detection:
            from ..detect.loss import DetectionLoss

            if len(inspect.signature(student.forward).parameters) < 2:
                raise ConfigError(
                    f"task: detection trains a detector called as model(images, targets); {type(student).__name__} "
                    "takes only images. Set model.task_head: fcos, retinanet or fasterrcnn, or pass a torchvision "
                    "detector to finetune(model=...)."
                )

            self.loss_fn = DetectionLoss(self._weights())
        else:
            self.loss_fn = SparsificationLoss(self._weights(), recipe.task, data.ignore_index)
        o, run = recipe.optim, recipe.run
        self.accum = o.accum_steps
        if o.global_batch_size:
            per_step = o.batch_size * info.world
            if o.global_batch_size % per_step:
                raise ConfigError(
                    f"optim.global_batch_size={o.global_batch_size} is not a multiple of batch_size x processes "
                    f"= {o.batch_size} x {info.world}; change one of them."
                )
            self.accum = o.global_batch_size // per_step
        if self.accum < 1:
            raise ConfigError(f"optim.accum_steps={self.accum} must be at least 1.")
        if self.detection:
            from ..detect import collate
        workers = default_workers() if recipe.data.workers is None else recipe.data.workers
        loader = partial(
            make_loader, batch_size=o.batch_size, rank=info.rank, world=info.world, seed=run.seed,
            workers=workers, pin_memory=self.device.type == "cuda",
            collate_fn=collate if self.detection else None,
        )  # fmt: skip
        self.train_loader = loader(data.train, train=True)
        self.val_loader = loader(data.val, train=False)
        self.spe = len(self.train_loader) // self.accum
        if self.spe == 0:
            raise DataError(
                f"the training set ({len(data.train)} images) is smaller than one optimizer step "
                f"({o.batch_size} x {info.world} processes x {self.accum} accumulation); use a smaller batch."
            )
        self.total_steps = max(1, math.ceil(o.epochs * self.spe))
        if o.max_steps is not None:
            self.total_steps = min(self.total_steps, o.max_steps)
        self.ratios: LearnedKeepRatios | None = None
        self.compute: ComputeModel | None = None
        self._teacher_features: torch.Tensor | None = None
        self._hook = None  # the teacher's forward hook, removed when `fit` ends
        if self.sparsified:
            self._setup_sparse(data)
        # A dense run has no new modules: everything trains at optim.lr.
        original = original_parameter_names(student, teacher) if self.sparsified else ()
        groups = param_groups(
            student, original, lr=o.lr, backbone_lr_scale=o.backbone_lr_scale, weight_decay=o.weight_decay
        )
        if self.ratios is not None:
            groups.append(
                {
                    "name": "keep_ratios",
                    "params": list(self.ratios.parameters()),
                    "lr": recipe.learned_ratios.lr,
                    "weight_decay": 0.0,
                }
            )
        self.optimizer = build_optimizer(groups, tuple(o.betas))
        self.scheduler = warmup_cosine(
            self.optimizer,
            total_steps=self.total_steps,
            warmup_steps=round(o.warmup_epochs * self.spe),
            start_factor=o.warmup_lr / o.lr,
            end_factor=o.min_lr / o.lr,
        )
        self.use_amp = bool(run.amp) and self.device.type == "cuda"
        self.amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(run.amp_dtype)
        if self.amp_dtype is None:
            raise ConfigError(f"run.amp_dtype={run.amp_dtype!r} is unknown; use 'bfloat16' or 'float16'.")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.model: nn.Module = self.student
        if info.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(
                self.student, device_ids=ids, find_unused_parameters=run.find_unused_parameters
            )
        self.step, self.teacher_top1, self.best_top1 = 0, None, None
        self.last_good: tuple[Path, int] | None = None  # (checkpoint, step) written or resumed by this run
        self._saved_step: int | None = None
        self.data_fingerprint = fingerprint(data)
        # Refuse a foreign run, other data or an unusable output_dir now, before anything is written there.
        self._resume = find_resume(recipe, self.total_steps, map_location=self.device, data=self.data_fingerprint)
        if info.main:
            check_output_dir(self.out)
            remove_stale_temps(self.out)
        self.metrics = MetricsWriter(self.out / "metrics.jsonl" if info.main else None)

    # -- set-up ---------------------------------------------------------------------------------------------------
    def _weights(self) -> LossWeights:
        spec = self.recipe.loss
        kind = spec.kind if spec.kind != "auto" else (self.config.kind if self.sparsified else "token")
        w = LossWeights.for_kind(
            kind,
            ce=spec.ce,
            ratio=spec.ratio,
            kl=spec.kl,
            distill=spec.distill,
            distill_type=spec.distill_type,
            temperature=spec.temperature,
            distill_point=spec.distill_point,
        )
        if not self.sparsified:
            w.ratio = w.distill = 0.0
        if self.teacher is None:
            w.kl = w.distill = 0.0
        return w

    def _setup_sparse(self, data: DataBundle) -> None:
        # One eval-mode forward (no randomness drawn) tells the chain's sizes and the block to hook on the teacher.
        was = self.student.training
        self.student.eval()
        example = data.val[0][0][None].to(self.device)
        with torch.no_grad():
            self.student(example)
        state = _state(self.student)
        self.student.train(was)
        if self.teacher is not None and self.loss_fn.weights.distill > 0:
            point, sink = self.loss_fn.weights.distill_point, lambda out: setattr(self, "_teacher_features", out)
            self._hook = hook_teacher(self.teacher, state, point, sink)
        spec = self.recipe.learned_ratios
        if not spec.enabled:
            return
        if not self.config.chain:
            raise ConfigError("learned keep ratios need the chain's block names in tokenprune.config_of(model).chain.")
        if spec.mlp_ratio != 4.0:
            warnings.warn(
                "learned_ratios.mlp_ratio is ignored: the cost model is measured on the model with fvcore; "
                "remove it from the recipe.",
                DeprecationWarning,
                stacklevel=2,
            )
        # The cost model is measured on this very model with fvcore (cost.py), so the budget means real MACs.
        self.compute = ComputeModel.calibrate(self.student, example)
        patches = self.compute.patches
        self.ratios = LearnedKeepRatios(self.config.keep_ratios, patches).to(self.device)
        # Start on the budget, keeping the configured allocation across stages.
        self.ratios.theta.data.add_(self.ratios.budget_shift(self.compute, spec.target_flops))

    # -- checkpoints (resume.py) ---------------------------------------------------------------------------------
    def selectors(self) -> list[nn.Module]:
        """The student's pruning stages, in order."""
        return _selectors(self.student)

    def save(self, name: str = "last.pt") -> Path:
        """Checkpoint the run (all ranks must call: random states are gathered; rank 0 writes)."""
        path = save_state(self, name)
        self._saved_step = self.step
        return path

    def resume(self, path: str | Path) -> None:
        """Restore everything the checkpoint at `path` holds, so training continues exactly."""
        ckpt = load_checkpoint(path, map_location=self.device)
        check_checkpoint(ckpt, Path(path))
        restore_state(self, ckpt, Path(path))

    # -- one step -------------------------------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast("cuda", dtype=self.amp_dtype) if self.use_amp else nullcontext()

    def _targets_to_device(self, y):
        if self.detection:
            from ..detect import targets_to

            return targets_to(y, self.device)
        return y.to(self.device, non_blocking=True)

    def _task_loss(self, x: torch.Tensor, y: list[dict]) -> tuple[LossOutput, Any, torch.Tensor | None]:
        """The detector's own losses (train mode, on the images and targets) with the sparsification terms; the
        teacher runs only for the feature distillation (its forward hook records its chain output)."""
        losses = self.model(list(x), y)
        state = _state(self.student) if self.sparsified else None
        if self.teacher is not None and self.loss_fn.weights.distill > 0:
            with torch.no_grad():
                self.teacher(list(x))
        rho = self.ratios() if self.ratios is not None else None
        return self.loss_fn(losses, state, self._teacher_features, keep_ratios=rho), state, rho

    def _forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[LossOutput, list[float]]:
        if self.detection:
            with self._autocast():
                out, state, rho = self._task_loss(x, y)
            return self._finish_loss(out, state, rho)
        with self._autocast():
            logits = self.model(x)
            logits = logits[0] if isinstance(logits, (tuple, list)) else logits
            state = _state(self.student) if self.sparsified else None
            t_logits = None
            if self.teacher is not None:
                with torch.no_grad():
                    t_logits = self.teacher(x)
                    t_logits = t_logits[0] if isinstance(t_logits, (tuple, list)) else t_logits
            rho = self.ratios() if self.ratios is not None else None
            out = self.loss_fn(logits, y, state, t_logits, self._teacher_features, keep_ratios=rho)
        return self._finish_loss(out, state, rho)

    def _finish_loss(self, out: LossOutput, state, rho) -> tuple[LossOutput, list[float]]:
        self._teacher_features = None
        if rho is not None:
            flops = self.compute.ratio(rho)
            out.parts["budget"] = budget_penalty(flops, self.recipe.learned_ratios.target_flops)
            out.parts["flops"] = flops.detach()
            out.total = out.total + self.recipe.learned_ratios.budget_weight * out.parts["budget"]
        kept = [float(d.detach().float().mean()) for d in state.decisions] if state is not None else []
        return out, kept

    def _optimizer_step(self) -> None:
        if self.ratios is not None and self.info.enabled:
            # reason: the ratio parameters live outside the DDP module, so their gradients are averaged here.
            for p in self.ratios.parameters():
                if p.grad is not None:
                    all_reduce_sum(p.grad, self.info).div_(self.info.world)
        self.scaler.unscale_(self.optimizer)
        if self.recipe.optim.clip_grad:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.recipe.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    # -- evaluation -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_metrics(self, model: nn.Module) -> dict[str, float]:
        """`model`'s scores in eval mode over the whole validation set (shared across ranks, no padding).

        Classification: ``{"top1"}``; segmentation: ``{"miou", "pixel_acc"}`` (train/metrics.py); detection:
        ``{"map", "map_50"}`` (COCO mAP@[.5:.95] and mAP@.5, `tokenprune.detect.metrics`), all in %.
        """
        was = model.training
        model.eval()
        if self.detection:
            from ..detect.metrics import DetectionScores

            scores = DetectionScores()
            self.val_loader.sampler.set_epoch(0)
            for x, y in batches(self.val_loader):
                with self._autocast():
                    detections = model(list(x.to(self.device, non_blocking=True)))
                scores.update(detections, self._targets_to_device(y))
            model.train(was)
            return scores.compute()
        segmentation = self.task == "segmentation"
        size = (self.num_classes, self.num_classes) if segmentation else (2,)
        counts = torch.zeros(size, dtype=torch.float64, device=self.device)
        self.val_loader.sampler.set_epoch(0)
        for x, y in batches(self.val_loader):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self._autocast():
                logits = model(x)
            logits = logits[0] if isinstance(logits, (tuple, list)) else logits
            if segmentation:
                counts += confusion_matrix(logits.argmax(1), y, self.num_classes, self.ignore_index)
            else:
                counts[0] += (logits.argmax(-1) == y).sum()
                counts[1] += y.numel()
        all_reduce_sum(counts, self.info)
        model.train(was)
        if segmentation:
            return segmentation_scores(counts)
        return {"top1": float(100.0 * counts[0] / counts[1].clamp(min=1))}

    @property
    def score_name(self) -> str:
        """The main validation score: "top1" (classification), "miou" (segmentation) or "map" (detection)."""
        return {"segmentation": "miou", "detection": "map"}.get(self.task, "top1")

    def evaluate(self, model: nn.Module) -> float:
        """The main score (%) of `model` over the validation set: top-1, mIoU (segmentation) or mAP (detection)."""
        return self.evaluate_metrics(model)[self.score_name]

    def apply_learned_ratios(self) -> list[float] | None:
        """Write the learned ratios, shifted onto the budget exactly, into the selectors and the config."""
        if self.ratios is None:
            return None
        with torch.no_grad():
            shift = self.ratios.budget_shift(self.compute, self.recipe.learned_ratios.target_flops)
            values = [float(r) for r in self.ratios(shift)]
        for sel, r in zip(_selectors(self.student), values, strict=True):
            sel.keep_ratio = r
        self.config.keep_ratios = values
        self.config.learned = True
        return values

    # -- the loop -------------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to `total_steps` (resuming when asked), then do the final phase (`finish`); return its metrics."""
        resumed, self._resume = self._resume, None  # (path, checkpoint) that __init__ accepted, or None
        if resumed is not None:
            restore_state(self, resumed[1], resumed[0])
            self._saved_step = self.step
        else:
            seed = self.recipe.run.seed + self.info.rank
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
        trained_already = resumed is not None and self.step >= self.total_steps
        reporter = ProgressReporter(self.total_steps, enabled=self.info.main)
        try:
            if resumed is not None:
                reporter.message(f"resumed from {resumed[0]} at step {self.step}/{self.total_steps}")
            if resumed is None and self.sparsified and self.recipe.sparsify.warm_start_steps:
                self._warm_start(reporter)
            if self.teacher is not None and self.teacher_top1 is None:
                scores = self.evaluate_metrics(self.teacher)
                self.teacher_top1 = scores[self.score_name]  # the main score (mIoU for segmentation)
                self.metrics.write("teacher", **scores)
                reporter.message(f"teacher {_describe(scores)}")
            while self.step < self.total_steps:
                self._epoch(reporter)
        finally:
            reporter.close()
            if self._hook is not None:
                self._hook.remove()
                self._hook = None
        if self._saved_step != self.step:
            self.save("last.pt")  # training is complete on disk before the final phase starts
        # Only a run that resumed at its last step may find its result already written (by an earlier call).
        return self.finish(reporter, reuse=trained_already)

    def finish(self, reporter: ProgressReporter | None = None, *, reuse: bool = False) -> dict[str, Any]:
        """The final phase, resumable as a step of its own: learned ratios applied, the final evaluation, `final.pt`.

        Run after training reached `total_steps` (and `last.pt` holds that state). When `final.pt` already holds
        this run's result (an earlier call completed; only with `reuse`, i.e. when this process trained nothing),
        its metrics are returned without evaluating again.
        """
        ratios = self.apply_learned_ratios()
        done = stored_result(self) if reuse else None
        if done is not None:
            if reporter is not None:
                reporter.message(f"the run had already finished at step {self.step}; its result is in final.pt")
            return done
        scores = self.evaluate_metrics(self.student)
        name = self.score_name
        result = {
            **scores,
            f"teacher_{name}": self.teacher_top1,
            "steps": self.step,
            "keep_ratios": [s.keep_ratio for s in _selectors(self.student)],
            "learned": ratios is not None,
        }
        if ratios is not None:
            result["flops_estimate"] = float(self.compute.ratio(torch.tensor(ratios)))
        if self.info.main:
            config = self.config
            payload = {
                "model": self.student.state_dict(),
                "sparsify_config": config.to_dict() if config else None,
                "recipe": self.recipe.to_dict(),
                "metrics": result,
                "step": self.step,
                "data": self.data_fingerprint,
            }
            save_checkpoint(payload, self.out / "final.pt")
        barrier(self.info)
        self.metrics.write("final", **result)  # after final.pt: a "final" record means the file is there
        if reporter is not None:
            teacher = f"(teacher {self.teacher_top1:.2f}%)" if self.teacher else ""
            reporter.message(f"final {_describe(scores)} {teacher}")
        return result

    def _warm_start(self, reporter: ProgressReporter) -> None:
        """Predictors imitate the attention scorer before fine-tuning (`warmstart.py`); checkpointed after it."""
        from .warmstart import warm_start

        spec = self.recipe.sparsify
        if self.teacher is None:
            raise ConfigError(
                "sparsify.warm_start_steps needs the dense teacher (its attention guides the warm start)."
            )
        self.train_loader.sampler.set_epoch(0, 0)
        self.train_loader.dataset.set_epoch(0)

        def log(step: int, values: dict[str, float]) -> None:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items())
            reporter.message(f"warm start {step}/{spec.warm_start_steps}: {shown}")
            self.metrics.write("warm_start", step=step, **values)

        steps, lr = spec.warm_start_steps, spec.warm_start_lr
        warm_start(self.student, self.teacher, self.train_loader, steps, lr, self.info, log)
        self.save("last.pt")

    def _epoch(self, reporter: ProgressReporter) -> None:
        epoch, done = divmod(self.step, self.spe)
        micro, end = done * self.accum, self.spe * self.accum
        self.train_loader.sampler.set_epoch(epoch, micro * self.recipe.optim.batch_size)
        self.train_loader.dataset.set_epoch(epoch)
        self.model.train()
        window: dict[str, float] = defaultdict(float)
        count, images, tick = 0, 0, time.perf_counter()
        bad = torch.zeros((), device=self.device)
        for x, y in batches(self.train_loader):
            x, y = x.to(self.device, non_blocking=True), self._targets_to_device(y)
            sync = (micro + 1) % self.accum == 0
            no_sync = self.model.no_sync() if (self.info.enabled and not sync) else nullcontext()
            with no_sync:
                out, kept = self._forward_loss(x, y)
                # reason: every rank must run backward (DDP's all-reduce would hang otherwise); a non-finite
                # loss is caught below, before the optimizer step can spread it into the weights.
                self.scaler.scale(out.total / self.accum).backward()
            if not bool(torch.isfinite(out.total.detach())):
                bad += 1
            micro += 1
            images += x.shape[0] * self.info.world
            for k, v in out.parts.items():
                window[k] += float(v.detach())
            window["loss"] += float(out.total.detach())
            for s, v in enumerate(kept):
                window[f"keep{s + 1}"] += v
            count += 1
            if not sync:
                continue
            if float(all_reduce_sum(bad, self.info)) > 0:
                self.optimizer.zero_grad(set_to_none=True)
                raise TrainingError(
                    f"non-finite loss at step {self.step + 1} (epoch {epoch}): "
                    f"{ {k: round(float(v.detach()), 4) for k, v in out.parts.items()} }. {last_good_hint(self)}; "
                    "lower optim.lr, set optim.clip_grad or run.amp=false, or check the data first."
                )
            self._optimizer_step()
            self.step += 1
            if self.step % self.recipe.run.log_every == 0 or micro >= end or self.step >= self.total_steps:
                elapsed = time.perf_counter() - tick
                values = {k: v / count for k, v in window.items()}
                values["lr"] = self.optimizer.param_groups[0]["lr"]
                values["img_s"] = round(images / max(elapsed, 1e-9), 1)
                reporter.step(self.step, values)
                self.metrics.write("train", step=self.step, epoch=epoch, **values)
                window.clear()
                count, images, tick = 0, 0, time.perf_counter()
            if micro >= end or self.step >= self.total_steps:
                break
            if self.recipe.run.checkpoint_every and self.step % self.recipe.run.checkpoint_every == 0:
                self.save("last.pt")
        if micro >= end:
            every = self.recipe.run.eval_every
            if every and (epoch + 1) % every == 0 and self.step < self.total_steps:
                self._evaluate_epoch(epoch, reporter)
            self.save("last.pt")

    def _evaluate_epoch(self, epoch: int, reporter: ProgressReporter) -> None:
        kept = [s.keep_ratio for s in _selectors(self.student)]
        ratios = self.apply_learned_ratios()
        scores = self.evaluate_metrics(self.student)
        score = scores[self.score_name]
        self.best_top1 = score if self.best_top1 is None else max(self.best_top1, score)
        self.metrics.write("eval", step=self.step, epoch=epoch, **scores, keep_ratios=ratios or kept)
        shown = ", ".join(f"{r:.4g}" for r in ratios or kept)
        reporter.message(f"epoch {epoch}: {_describe(scores)} (teacher {self.teacher_top1}) keep ratios [{shown}]")
