"""A run's output folder: whose work it holds, whether a new run may use it, and how folders are
published there so that a killed run never leaves a half-replaced one.

- Each stage folder records the fingerprint of what determines that stage's result
  (`fingerprint.json`: the model and its files, the seed, the world size, the engine, and every
  stage up to this one with its STS settings and its data file's digest). `resume=true` continues
  only a run with the same fingerprints and names the keys that differ otherwise; a fresh run
  into a folder that holds a run's work is refused unless `overwrite=true`, which deletes the
  recipe's stage folders first. Keys that do not change what a run computes may differ on a
  resume (RESUMABLE).
- A folder is published by renaming it in from the stage's staging folder; one it replaces is
  renamed aside first and deleted last, so a whole one exists at every moment and `settle`
  finishes whatever a killed run left in between.
- Before any work, the output folder must be a writable folder with room for a checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from sts.cli.distributed import is_main, world_size
from sts.cli.recipes import RecipeConfig

STAGING = ".staging"  # inside a stage's folder: what is being written
ASIDE = ".old"  # suffix, in the staging folder, of a published folder being replaced
FINGERPRINT = "fingerprint.json"
# Keys of a stage (and of its data) that may change when a run is resumed: they decide how it is
# saved, logged and fed, not what it computes.
RESUMABLE = (
    "save_steps",
    "save_total_limit",
    "logging_steps",
    "report_to",
    "dataloader_num_workers",
    "resume_from_checkpoint",
)
RESUMABLE_DATA = ("cache",)


class RunError(RuntimeError):
    """An output folder a run cannot use as it is; the message names it and says what to do."""


class TrainingError(RuntimeError):
    """A run that cannot go on; the message names the stage and step."""


def file_digest(path: Path) -> str:
    """A content digest of a file, read in chunks."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def model_files(path: str | None) -> dict | None:
    """A checkpoint folder's identity: its config's digest and each weight file's size."""
    if path is None:
        return None
    folder = Path(path)
    weights = {file.name: file.stat().st_size for file in sorted(folder.glob("*.safetensors"))}
    return {"config": file_digest(folder / "config.json"), "weights": weights}


def fingerprints(cfg: RecipeConfig) -> list[dict]:
    """For each stage, what determines its result: everything before it and itself."""
    digests: dict[str, str] = {}
    stages = []
    for stage in cfg.stages:
        data = cfg.data_for(stage)
        if data.train not in digests:  # a missing file is the dataset's one-line error, after the model's
            digests[data.train] = file_digest(Path(data.train)) if Path(data.train).is_file() else None
        entry = stage.model_dump(mode="json", exclude={*RESUMABLE, "data", "vtc", "lds"})
        entry["sts"] = cfg.sts_for(stage).model_dump(mode="json")
        entry["data"] = {**data.model_dump(mode="json", exclude=set(RESUMABLE_DATA)), "digest": digests[data.train]}
        stages.append(entry)
    common = {
        "model": cfg.model.model_dump(mode="json"),
        "model_files": model_files(cfg.model.path),
        "seed": cfg.seed,
        "world_size": world_size(),
        "distributed": cfg.distributed,
        "deepspeed_config": cfg.deepspeed_config and file_digest(Path(cfg.deepspeed_config)),
    }
    return [{**common, "stages": stages[: index + 1]} for index in range(len(stages))]


def differences(saved, current, key: str = "") -> list[str]:
    """Where two fingerprints differ, each as `key (saved value, now current value)`."""
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = [*saved, *(k for k in current if k not in saved)]
        return [line for k in keys for line in differences(saved.get(k), current.get(k), f"{key}.{k}".lstrip("."))]
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        return [line for i, (a, b) in enumerate(zip(saved, current)) for line in differences(a, b, f"{key}.{i}")]
    return [] if saved == current else [f"{key} ({brief(saved)}, now {brief(current)})"]


def brief(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_fingerprint(stage_dir: Path) -> dict | None:
    try:
        return json.loads((stage_dir / FINGERPRINT).read_text())
    except (OSError, ValueError):
        return None


def write_fingerprint(stage_dir: Path, fingerprint: dict) -> None:
    """Record the stage's fingerprint, whole or not at all."""
    partial = stage_dir / f".{FINGERPRINT}.partial"
    partial.write_text(json.dumps(fingerprint, indent=1))
    os.replace(partial, stage_dir / FINGERPRINT)


def has_work(stage_dir: Path) -> bool:
    """Whether a stage folder holds anything published (a checkpoint, a model, a fingerprint); what
    is hidden there (the staging folder, a fingerprint being written) is not yet."""
    return stage_dir.is_dir() and any(not entry.name.startswith(".") for entry in stage_dir.iterdir())


def prepare_output(cfg: RecipeConfig, prints: list[dict]) -> None:
    """Refuse an output folder this run may not use, in one line; else clear it (overwrite) or
    settle what a killed run left (resume). Every rank checks the same files alike; only rank 0
    deletes, and settling is safe to run on every rank at once."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise RunError(f"output_dir {out} is a file, not a folder; name a folder")
    stage_dirs = [out / stage.name for stage in cfg.stages]
    if cfg.overwrite:
        inside = [
            stage.name
            for stage in cfg.stages
            if stage.resume_from_checkpoint not in (None, "latest")
            and any(Path(stage.resume_from_checkpoint).resolve().is_relative_to(d.resolve()) for d in stage_dirs)
        ]
        if inside:
            raise RunError(
                f"overwrite=true would delete the checkpoint that stage {inside[0]}'s "
                "resume_from_checkpoint names; copy it elsewhere first"
            )
        if is_main():
            for stage_dir in stage_dirs:
                shutil.rmtree(stage_dir, ignore_errors=True)
        return
    used = [stage_dir for stage_dir in stage_dirs if has_work(stage_dir)]
    if used and not cfg.resume:
        raise RunError(
            f"output_dir {out} holds a run's work ({', '.join(d.name for d in used)}); resume=true "
            "continues it, overwrite=true deletes it and starts over, or choose another output_dir"
        )
    for stage_dir, fingerprint in zip(stage_dirs, prints):
        if stage_dir not in used:
            continue
        saved = read_fingerprint(stage_dir)
        if saved is None:
            raise RunError(
                f"resume=true: {stage_dir} holds work without a {FINGERPRINT}, so whose run it is cannot "
                "be told; overwrite=true deletes it and starts over"
            )
        changed = differences(saved, fingerprint)
        if changed:
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            raise RunError(
                f"resume=true: {stage_dir} holds the work of a run that differs in {'; '.join(changed[:3])}"
                f"{more}; set those back to resume it, or overwrite=true to start over (may differ on "
                f"a resume: {', '.join(RESUMABLE)})"
            )
    for stage_dir in stage_dirs:
        settle(stage_dir)


def replace_folder(new: Path, folder: Path) -> None:
    """Rename `new` (whole, in a staging folder) to `folder`; a `folder` already there is renamed
    aside first and deleted last, so that a whole one exists at every moment (see `settle`)."""
    aside = new.with_name(new.name + ASIDE)
    if folder.exists():
        os.replace(folder, aside)
    os.replace(new, folder)
    shutil.rmtree(aside, ignore_errors=True)
    with contextlib.suppress(OSError):  # the staging folder, once it holds nothing else
        new.parent.rmdir()


def settle(stage_dir: Path) -> None:
    """Finish what a killed run left in a stage's staging folder, then delete the rest: a folder
    renamed aside whose replacement was not yet renamed in means that replacement was whole, so
    it goes in; anything else there is half-written. Safe on several ranks at once."""
    staging = stage_dir / STAGING
    if not staging.is_dir():
        return
    for aside in staging.glob(f"*{ASIDE}"):
        name = aside.name.removesuffix(ASIDE)
        if not (stage_dir / name).exists():
            with contextlib.suppress(FileNotFoundError):  # another rank moved it in already
                os.replace(staging / name, stage_dir / name)
    shutil.rmtree(staging, ignore_errors=True)


def check_room(output_dir: str, model, checkpoints: bool) -> None:
    """Before any training: the output folder (or, while it does not exist, the folder it will be
    made in) can be written, and has room for the model (and, when the recipe saves checkpoints,
    one checkpoint with AdamW's two states). Nothing is left behind."""
    out = Path(output_dir).absolute()
    existing = next(folder for folder in (out, *out.parents) if folder.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(existing))
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise RunError(
            f"output_dir {output_dir} cannot be written ({error.strerror} at {existing}); choose another "
            "output_dir or fix its permissions"
        ) from None
    parameters = list(model.parameters())
    needed = sum(p.numel() * p.element_size() for p in parameters)
    if checkpoints:
        needed += sum(p.numel() for p in parameters) * 8
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise RunError(
            f"output_dir {output_dir} has {size(free)} free, less than the {size(needed)} "
            f"{'a checkpoint' if checkpoints else 'the model'} needs; free some space or choose another output_dir"
        )


def size(count: int) -> str:
    """Bytes as people read them."""
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"
