"""The Trainer of `sts train`: a `transformers.Trainer` that a long run can trust.

- Nothing broken is published. Before each optimizer step, the losses of its micro-batches and
  its gradients are checked finite on every rank (agreed by one all-reduce in a run of several
  processes): a NaN or infinite one stops the run naming the stage, the step and which, before
  that step changes the weights, or, with `on_nonfinite_loss: skip`, drops that step on every
  rank (its gradients are discarded, as a mixed-precision loss scaler drops a step). Before a
  checkpoint or the model is written, every weight is checked finite.
- Checkpoints and the model are written whole or not at all: each is saved into the stage's
  staging folder and renamed into place once complete (`sts.cli.runs.replace_folder`), with the
  stage's fingerprint beside it.
- `group_by_length`: batches of records of similar length, from `LlavaDataset.lengths()` (the
  Trainer's own grouping would encode every record, images included, to learn it).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from sts.cli.runs import STAGING, RunError, TrainingError, replace_folder, write_fingerprint
from sts.compat import rotate_checkpoints

logger = logging.getLogger("sts.train")


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def any_rank(flags: torch.Tensor) -> torch.Tensor:
    """The flags, each true if it is true on any rank of a distributed run."""
    if distributed():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


def any_rank_sum(counts: torch.Tensor) -> torch.Tensor:
    """The counts summed over the ranks of a distributed run."""
    if distributed():
        dist.all_reduce(counts)
    return counts


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """What of a parameter or gradient this rank holds: its FSDP2 shard, its ZeRO-3 partition, or itself."""
    if hasattr(tensor, "ds_tensor"):
        return tensor.ds_tensor
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def gradients_finite(model) -> bool:
    """Whether every gradient this rank holds is finite (ZeRO keeps its gradients to itself: see
    `NonFiniteGuard.on_optimizer_step`)."""
    gradients = [local_part(p.grad) for p in model.parameters() if p.grad is not None]
    return not gradients or bool(torch.stack([torch.isfinite(g).all() for g in gradients]).all())


class RecipeTrainer(Trainer):
    def __init__(
        self,
        *args,
        stage_name: str,
        on_nonfinite_loss: str = "error",
        group_by_length: bool = False,
        fingerprint: dict | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.stage_name = stage_name
        self.on_nonfinite_loss = on_nonfinite_loss
        self.group_by_length = group_by_length
        self.fingerprint = fingerprint
        self.nonfinite_loss: float | None = None  # the first non-finite loss of this optimizer step
        self.dropped_steps: list[int] = []
        self.add_callback(NonFiniteGuard(self))

    def _get_train_sampler(self, train_dataset=None):
        if not self.group_by_length:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
        return LengthGroupedSampler(
            batch,
            lengths=dataset.lengths(),
            generator=torch.Generator().manual_seed(self.args.data_seed or self.args.seed),
        )

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.nonfinite_loss is None and not torch.isfinite(loss):
            self.nonfinite_loss = loss.item()  # judged before the optimizer step, on every rank alike
        return loss

    def _save_checkpoint(self, model, trial):
        """Write checkpoint-N into the staging folder, then rename it into place."""
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self.check_weights_finite(name)
        run_dir = self.args.output_dir
        self.args.output_dir = os.path.join(run_dir, STAGING)
        try:
            with self.writing(Path(run_dir, STAGING, name)):
                super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = run_dir
        self.publish(Path(run_dir, STAGING, name), Path(run_dir, name))
        if self.args.should_save:
            rotate_checkpoints(self, run_dir)

    def save_model_whole(self, folder: Path) -> None:
        """The final model, saved like a checkpoint: complete under its name, or absent."""
        self.check_weights_finite("the model")
        staging = folder.parent / STAGING / folder.name
        with self.writing(staging):
            self.save_model(str(staging))
        self.publish(staging, folder)

    def check_weights_finite(self, what: str) -> None:
        """Stop, on every rank, before `what` is written if any weight is not finite."""
        named = [(name, local_part(p).detach()) for name, p in self.model.named_parameters()]
        bad = torch.stack([(~torch.isfinite(t)).sum() for _, t in named])
        counts = torch.stack([bad.sum(), bad.new_tensor(sum(t.numel() for _, t in named))]).double()
        counts = any_rank_sum(counts.to(self.args.device))
        if counts[0] > 0:
            local = bad.tolist()
            first = next((name for (name, _), count in zip(named, local) if count), "on another rank")
            raise TrainingError(
                f"stage {self.stage_name}, step {self.state.global_step}: {int(counts[0]):,} of {int(counts[1]):,} "
                f"weights are not finite (first: {first}); {what} was not written"
            )

    @contextlib.contextmanager
    def writing(self, folder: Path):
        """An OS error while writing `folder` (a full or read-only disk) as one line."""
        try:
            yield
        except OSError as error:
            raise RunError(
                f"stage {self.stage_name}, step {self.state.global_step}: cannot write {error.filename or folder} "
                f"({error.strerror or error}); free space or fix the output folder, then run again with resume=true"
            ) from None

    def publish(self, staging: Path, folder: Path) -> None:
        """Once every rank has written its part into `staging`, rank 0 records the stage's
        fingerprint and moves it to `folder` (replacing a stale one); the others wait for that."""
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            with self.writing(folder):
                if self.fingerprint is not None:
                    write_fingerprint(folder.parent, self.fingerprint)
                replace_folder(staging, folder)
        self.accelerator.wait_for_everyone()


class NonFiniteGuard(TrainerCallback):
    """Before each optimizer step, stop or drop it (`on_nonfinite_loss`) if a loss of its
    micro-batches or its gradient was not finite on any rank; every rank decides alike."""

    def __init__(self, trainer: RecipeTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        trainer = self.trainer
        loss, trainer.nonfinite_loss = trainer.nonfinite_loss, None
        flags = torch.tensor([loss is not None, not gradients_finite(model)], dtype=torch.float32, device=args.device)
        loss_bad, gradient_bad = any_rank(flags).tolist()
        if not (loss_bad or gradient_bad):
            return
        step = state.global_step + 1
        if loss is not None:
            what = f"the loss is {loss}"
        elif loss_bad:
            what = "the loss is not finite (on another rank)"
        else:
            what = "the gradient is not finite (with a finite loss)"
        if trainer.on_nonfinite_loss == "error":
            raise TrainingError(
                f"stage {trainer.stage_name}: {what} at step {step}; stopped before that step changed the weights "
                "(stages.N.on_nonfinite_loss: skip drops such steps instead)"
            )
        model.zero_grad(set_to_none=True)  # the optimizer leaves parameters without gradients alone
        trainer.dropped_steps.append(step)
        logger.warning("sts: stage %s, step %d: %s; the step was dropped", trainer.stage_name, step, what)

    def on_optimizer_step(self, args, state, control, **kwargs):
        """DeepSpeed (ZeRO) keeps gradients in its own buffers and steps inside its engine: its
        gradient norm is checked once it has stepped, and a run that cannot go on stops there."""
        engine = self.trainer.model_wrapped
        if not self.trainer.is_deepspeed_enabled or not hasattr(engine, "get_global_grad_norm"):
            return
        norm = engine.get_global_grad_norm()
        if norm is not None and not math.isfinite(float(norm)):
            raise TrainingError(
                f"stage {self.trainer.stage_name}: the gradient is not finite at step {state.global_step + 1} "
                "(DeepSpeed applied it); stopped before anything more was written"
            )
