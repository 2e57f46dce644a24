"""Interruption and numerics: a run killed with SIGKILL resumes and reproduces the uninterrupted
run; checkpoints are whole or absent; a non-finite loss stops the run or drops its step."""

import inspect
import signal
import subprocess
import time

import psutil
import pytest
import torch
import transformers
from transformers import AutoModelForImageTextToText

from sts.cli.data.dataset import LlavaDataset
from sts.cli.recipe_trainer import STAGING, RecipeTrainer, TrainingError
from sts.cli.recipes import load_recipe
from sts.cli.train import initial_model, run_stage
from tests.test_end_to_end import tiny_overrides
from tests.traced_run import LAUNCH_TIMEOUT_S, command, launch, recipe

STEPS = 40
# Instruction tuning with every random draw STS makes: skipped layers and a random token selection.
INSTRUCT = [
    f"stages.1.max_steps={STEPS}",
    "stages.1.save_steps=5",
    "stages.1.logging_steps=1",
    "lds.alpha=0.9",
    "stages.1.vtc={strategy: random, keep_ratio: 0.5}",
]


def kill_when_saved(line: list[str], environment: dict, checkpoint) -> int:
    """Start a run and SIGKILL it (every process of it) as soon as `checkpoint` exists; its exit status."""
    run = subprocess.Popen(line, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not checkpoint.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    workers = psutil.Process(run.pid).children(recursive=True)  # torchrun's, each in a session of its own
    for process in [psutil.Process(run.pid), *workers]:
        process.kill()
    psutil.wait_procs(workers)
    return run.wait()


# Some transformers releases (5.0 among them) load a resumed multi-process run's optimizer state onto
# `args.device`, which on CPU is a device torch cannot restore to ("cpu:0"); on GPUs it is the rank's
# GPU. Newer releases load it onto plain "cpu" there (they test the device's type).
CPU_RESUME_BROKEN = "self.args.device if self.args.world_size > 1 else" in inspect.getsource(
    transformers.Trainer._load_optimizer_and_scheduler
)


@pytest.mark.parametrize(
    "processes",
    [
        1,
        pytest.param(
            2,
            marks=pytest.mark.skipif(
                CPU_RESUME_BROKEN and not torch.cuda.is_available(),
                reason="this transformers cannot resume a multi-process run on CPU",
            ),
        ),
    ],
)
def test_a_run_killed_mid_stage_resumes_and_reproduces_the_uninterrupted_run(processes, synth_data, tmp_path):
    steps = [*INSTRUCT, *(["stages.1.batch_size=2"] if processes > 1 else [])]  # the data lasts the 40 steps
    reference = launch(processes, tmp_path / "reference", *recipe(synth_data, tmp_path / "reference" / "run", *steps))

    killed = tmp_path / "killed" / "run"
    line, environment = command(processes, tmp_path / "killed", *recipe(synth_data, killed, *steps))
    assert kill_when_saved(line, environment, killed / "instruct" / "checkpoint-10") == -signal.SIGKILL
    assert (killed / "align" / "model").exists() and not (killed / "instruct" / "model").exists()

    resumed = launch(processes, tmp_path / "killed", *recipe(synth_data, killed, *steps, "resume=true"))
    for rank in range(processes):
        assert resumed[rank][0]["step"] > 10 and resumed[rank][-1]["step"] == STEPS  # instruction tuning's last steps
        by_step = {step["step"]: step for step in reference[rank][2:]}  # after alignment's 2 steps
        for step in resumed[rank]:
            expected = by_step[step["step"]]
            assert step["forwards"] == expected["forwards"], f"rank {rank}, step {step['step']}: skips or tokens"
            if "loss" in step:  # logged by rank 0
                assert step["loss"] == pytest.approx(expected["loss"], abs=1e-4), f"step {step['step']}"
    assert any(forward["skipped_layers"] for step in resumed[0] for forward in step["forwards"])
    final = AutoModelForImageTextToText.from_pretrained(killed / "instruct" / "model").state_dict()
    uninterrupted = AutoModelForImageTextToText.from_pretrained(
        tmp_path / "reference" / "run" / "instruct" / "model"
    ).state_dict()
    assert max((final[k] - uninterrupted[k]).abs().max().item() for k in final) < 1e-4


def stage_run(synth_data, tmp_path, *overrides: str):
    """What `run_stage` needs for the tiny recipe's first stage, with `overrides`."""
    cfg = load_recipe(
        "demo",
        [
            *tiny_overrides(synth_data, tmp_path),
            "stages.0.data=null",
            "stages.0.batch_size=4",
            "stages.0.max_steps=4",
            "stages.0.save_steps=1",
            *overrides,
        ],
    )
    model, processor = initial_model(cfg)
    return cfg.stages[0], model, processor, LlavaDataset(synth_data["train"], processor)


def test_a_checkpoint_is_whole_or_absent(synth_data, tmp_path, monkeypatch):
    stage, model, processor, dataset = stage_run(synth_data, tmp_path)
    original = RecipeTrainer._save_rng_state

    def dies_at_step_3(self, output_dir):
        if self.state.global_step == 3:
            raise KeyboardInterrupt("killed while saving")
        original(self, output_dir)

    monkeypatch.setattr(RecipeTrainer, "_save_rng_state", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run_stage(stage, model, processor, dataset, tmp_path / "align", seed=0)
    saved = sorted(path.name for path in (tmp_path / "align").glob("checkpoint-*"))
    assert saved == ["checkpoint-1", "checkpoint-2"]  # the half-written checkpoint-3 never took its name
    assert (tmp_path / "align" / STAGING / "checkpoint-3").exists()

    monkeypatch.setattr(RecipeTrainer, "_save_rng_state", original)
    result = run_stage(stage, model, processor, dataset, tmp_path / "align", seed=0, resuming_run=True)
    assert result["steps"] == 4 and not (tmp_path / "align" / STAGING).exists()


def nan_logits_at(model, forward: int):
    """Make the `forward`-th training forward's logits NaN (1-based)."""
    calls = {"count": 0}

    def poison(module, args, output):
        calls["count"] += 1
        return output * float("nan") if calls["count"] == forward else output

    model.lm_head.register_forward_hook(poison)


def test_a_nan_loss_stops_the_run_naming_stage_and_step(synth_data, tmp_path):
    stage, model, processor, dataset = stage_run(synth_data, tmp_path)
    nan_logits_at(model, 3)
    with pytest.raises(TrainingError, match="stage align: the loss is nan at step 3"):
        run_stage(stage, model, processor, dataset, tmp_path / "align", seed=0)
    saved = sorted(path.name for path in (tmp_path / "align").glob("checkpoint-*"))
    assert saved == ["checkpoint-1", "checkpoint-2"] and not (tmp_path / "align" / "model").exists()
    weights = AutoModelForImageTextToText.from_pretrained(tmp_path / "align" / "checkpoint-2").state_dict()
    assert all(torch.isfinite(value).all() for value in weights.values())


def test_a_nan_loss_in_skip_mode_drops_that_step_only(synth_data, tmp_path):
    stage, model, processor, dataset = stage_run(synth_data, tmp_path, "stages.0.on_nonfinite_loss=skip")
    nan_logits_at(model, 3)
    result = run_stage(stage, model, processor, dataset, tmp_path / "align", seed=0)
    assert result["dropped_steps"] == [3] and result["steps"] == 4
    after_2 = AutoModelForImageTextToText.from_pretrained(tmp_path / "align" / "checkpoint-2").state_dict()
    after_3 = AutoModelForImageTextToText.from_pretrained(tmp_path / "align" / "checkpoint-3").state_dict()
    final = AutoModelForImageTextToText.from_pretrained(tmp_path / "align" / "model").state_dict()
    projector = next(key for key in final if "multi_modal_projector" in key)
    assert torch.equal(after_2[projector], after_3[projector]), "the dropped step left the weights as they were"
    assert not torch.equal(after_3[projector], final[projector]) and torch.isfinite(final[projector]).all()
