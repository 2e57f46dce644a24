"""What differs between the transformers releases sts supports (5.0 to the newest 5.x), in one place.

Each difference is a name that moved or appeared: callers ask here and get what the installed
release has, so nothing else in sts tests a version.
"""

from __future__ import annotations

import inspect

import transformers


def pil_image_processor(name: str):
    """The image processor `name` that works on PIL images without torchvision: `<name>Pil` since
    transformers 5.4, the plain `<name>` before (torchvision was then only for `<name>Fast`)."""
    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


def checkpointing_arguments(enabled: bool) -> dict:
    """TrainingArguments for activation checkpointing without reentrant autograd: named
    `activation_checkpointing` in newer releases, `gradient_checkpointing` (deprecated since) before."""
    names = inspect.signature(transformers.TrainingArguments.__init__).parameters
    prefix = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {prefix: enabled, f"{prefix}_kwargs": {"use_reentrant": False}}


def set_activation_checkpointing(model, enabled: bool = True) -> None:
    """A model's own activation checkpointing on (without reentrant autograd) or off (the methods
    were renamed like the argument)."""
    renamed = hasattr(model, "activation_checkpointing_enable")
    if not enabled:
        (model.activation_checkpointing_disable if renamed else model.gradient_checkpointing_disable)()
    elif renamed:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def rotate_checkpoints(trainer, run_dir: str) -> None:
    """Delete a run's oldest checkpoints past `save_total_limit` (a function of trainer_utils in newer
    releases, a Trainer method before)."""
    from transformers import trainer_utils

    if hasattr(trainer_utils, "rotate_checkpoints"):
        trainer_utils.rotate_checkpoints(
            output_dir=run_dir,
            save_total_limit=trainer.args.save_total_limit,
            best_model_checkpoint=trainer.state.best_model_checkpoint,
            use_mtime=False,
        )
    else:
        trainer._rotate_checkpoints(use_mtime=False, output_dir=run_dir)


def returns_tuple(layer) -> bool:
    """Whether a decoder layer returns a tuple whose first item is the hidden states (Qwen2-VL's and
    Qwen2.5-VL's before transformers 5.x made every decoder layer return the tensor itself)."""
    return str(inspect.signature(type(layer).forward).return_annotation).startswith("tuple")


def in_model_layout(weights: dict, model) -> dict:
    """Weights saved under another release, named as `model` names them: LLaVA's CLIP tower lost a
    `vision_model.` level in its parameter names during 5.x."""
    names = set(model.state_dict())

    def renamed(key: str) -> str:
        for old, new in (
            (".vision_tower.", ".vision_tower.vision_model."),
            (".vision_tower.vision_model.", ".vision_tower."),
        ):
            if key not in names and key.replace(old, new, 1) in names:
                return key.replace(old, new, 1)
        return key

    return {renamed(key): value for key, value in weights.items()}
