"""The Trainer of `sts train`: a `transformers.Trainer` that a long run can trust.

- Checkpoints are written whole or not at all: each is saved into a staging folder and renamed
  into place once complete, so a run killed while saving leaves no half-written checkpoint-N
  for a resume to pick up (the rename is atomic on one filesystem).
- A NaN or infinite loss stops the run with the stage and step (nothing from that step reaches
  the weights or a checkpoint), or, with `on_nonfinite_loss: skip`, drops that optimizer step
  on every rank: its gradients are discarded, as a mixed-precision loss scaler drops a step.
- `group_by_length`: batches of records of similar length, from `LlavaDataset.lengths()` (the
  Trainer's own grouping would encode every record, images included, to learn it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

STAGING = ".staging"  # inside a stage's output folder: what is being written
logger = logging.getLogger("sts.train")


class TrainingError(RuntimeError):
    """A run that cannot go on; the message names the stage and step."""


class RecipeTrainer(Trainer):
    def __init__(
        self, *args, stage_name: str, on_nonfinite_loss: str = "error", group_by_length: bool = False, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.stage_name = stage_name
        self.on_nonfinite_loss = on_nonfinite_loss
        self.group_by_length = group_by_length
        self.nonfinite_in_step = False
        self.dropped_steps: list[int] = []
        if on_nonfinite_loss == "skip":
            self.add_callback(DropNonFiniteSteps(self))  # a collective every step: only when asked for

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
        if not torch.isfinite(loss):
            step = self.state.global_step + 1
            if self.on_nonfinite_loss == "error":
                raise TrainingError(
                    f"stage {self.stage_name}: the loss is {loss.item()} at step {step}; stopped "
                    f"before that step changed the weights (stages.N.on_nonfinite_loss: skip "
                    f"drops such steps instead)"
                )
            self.nonfinite_in_step = True
        return loss

    def _save_checkpoint(self, model, trial):
        """Write checkpoint-N into the staging folder, then rename it into place."""
        run_dir = self.args.output_dir
        self.args.output_dir = os.path.join(run_dir, STAGING)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = run_dir
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self.publish(Path(run_dir, STAGING, name), Path(run_dir, name))
        if self.args.should_save:
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )

    def save_model_whole(self, folder: Path) -> None:
        """The final model, saved like a checkpoint: complete under its name, or absent."""
        staging = folder.parent / STAGING / folder.name
        self.save_model(str(staging))
        self.publish(staging, folder)

    def publish(self, staging: Path, folder: Path) -> None:
        """Once every rank has written its part into `staging`, rank 0 moves it to `folder`
        (replacing a stale one); the others wait for that."""
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(staging, folder)
            with contextlib.suppress(OSError):  # the staging folder, once it holds nothing else
                staging.parent.rmdir()
        self.accelerator.wait_for_everyone()


class DropNonFiniteSteps(TrainerCallback):
    """In `skip` mode, discard the gradients of an optimizer step in which a loss was not
    finite, on every rank when any rank saw one (the weights stay the same on all ranks)."""

    def __init__(self, trainer: RecipeTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        seen = torch.tensor(float(self.trainer.nonfinite_in_step), device=args.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(seen, op=dist.ReduceOp.MAX)
        self.trainer.nonfinite_in_step = False
        if seen.item():
            model.zero_grad(set_to_none=True)  # the optimizer leaves parameters without gradients alone
            self.trainer.dropped_steps.append(state.global_step + 1)
            logger.warning(
                "sts: stage %s, step %d: the loss was not finite; the step was dropped",
                self.trainer.stage_name,
                state.global_step + 1,
            )
