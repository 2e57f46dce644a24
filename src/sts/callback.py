"""`STSCallback`: STS in any `transformers.Trainer` (and Trainers built on it, such as TRL's),
with one line beside `apply_sts`.

It moves STS's schedule with the Trainer's optimizer steps, so the skipper fades and the
compressor's schedules advance as the run does; a resumed run restores its global step, and
with it the schedule. Gradient accumulation needs nothing: micro-batches of one optimizer step
share its progress and draw their own skips. What STS did since the last log line goes into every
training log line (`sts/...`: sums of samples, images and visual tokens in and kept, means per
forward of sequence lengths and skipped layers, the running skip rate), in the Trainer's log
history and to every callback after this one.
transformers puts `report_to`'s loggers (TensorBoard, W&B) ahead of the callbacks passed to the
Trainer, so `STSCallback.add_to(trainer)` is the way to have them record STS's stats too.
With `torch_compile=True` and layers to skip it warns: `sts.compile_layers` is the compile for that.
A step that ran without STS's forward (something wrapped the model after `apply_sts`, as TRL's
trainers do when built) stops training with that advice rather than silently training dense.
"""

from __future__ import annotations

from transformers import TrainerCallback
from transformers.utils import logging

from sts.config import STSConfig
from sts.lds import can_skip
from sts.patch import apply_sts, has_sts, set_progress, state_of, window_stats

logger = logging.get_logger(__name__)


class STSCallback(TrainerCallback):
    """`STSCallback()` drives STS that `apply_sts` attached; `STSCallback(config)` also attaches it
    (an `STSConfig` or its dict) to the Trainer's model when training begins, for tools that build
    the model and the Trainer themselves and take only callbacks (LLaMA-Factory, ms-swift)."""

    def __init__(self, config: STSConfig | dict | None = None):
        self.config = config
        self.ahead_of_loggers = False

    @classmethod
    def add_to(cls, trainer, config: STSConfig | dict | None = None) -> STSCallback:
        """Put STS first in a built Trainer's callbacks, so report_to's loggers see its stats."""
        callback = cls(config)
        callback.ahead_of_loggers = True
        callbacks = trainer.callback_handler.callbacks
        callbacks[:] = [callback] + [c for c in callbacks if not isinstance(c, STSCallback)]
        return callback

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.config is not None and not has_sts(model):
            apply_sts(model, self.config)
        if (
            args.torch_compile
            and has_sts(model)
            and can_skip(state_of(model).adapter.num_layers, state_of(model).cfg.lds)
        ):
            logger.warning(
                "sts: torch_compile=True compiles the whole model, and every set of layers the skipper leaves "
                "out is another graph (a recompile nearly every step); compile the layers instead: "
                "sts.compile_layers(model) before training, with torch_compile=False"
            )
        if not self.ahead_of_loggers and [name for name in args.report_to if name != "none"]:
            logger.warning(
                "sts: report_to=%s logs before callbacks=[STSCallback()] adds its stats; "
                "use sts.STSCallback.add_to(trainer) to have them logged there",
                args.report_to,
            )

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        set_progress(model, state.global_step, state.max_steps)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state_of(model).micro_batch == 0:
            raise ValueError(
                "sts: a training step ran without STS's forward: something replaced the model's "
                "forward after apply_sts (TRL's trainers do, for their fused LM head); call "
                "sts.apply_sts(trainer.model, ...) after building the trainer"
            )

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        stats = {f"sts/{key}": value for key, value in window_stats(model).items()}
        logs.update(stats)
        if state.log_history and state.log_history[-1].get("loss") == logs["loss"]:
            state.log_history[-1].update(stats)  # the Trainer stored this line before calling back
