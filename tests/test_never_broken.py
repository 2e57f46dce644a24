"""Never publish a broken model, end to end through the `sts` command: non-finite gradients and
weights, another run's checkpoints, a changed config on resume, a replace killed half-way, and
every error a user can cause as one line."""

import json
import re
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file

from sts.cli import main
from sts.cli.runs import ASIDE, STAGING, replace_folder, settle
from tests.test_end_to_end import tiny_overrides

# The instruction-tuning stage alone, a checkpoint every step.
INSTRUCT = [
    "stages=[{name: instruct, learning_rate: 1e-3, max_steps: 6, batch_size: 4, save_steps: 1, logging_steps: 1, "
    "train: {projector: full, language_model: full}}]"
]


class Killed(BaseException):
    """Stands in for a SIGKILL at a chosen point."""


def run(synth_data, out, *overrides: str) -> int:
    return main(["train", "demo", *tiny_overrides(synth_data, out), *INSTRUCT, *overrides])


def error_line(capsys) -> str:
    """The one `sts: error:` line of a failed command (which must start a line of its own)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = re.findall(r"^sts: error: .*$", err, re.M)
    assert len(lines) == 1, err
    return lines[0]


def at_step(step: int, action, monkeypatch):
    """Run `action(trainer, model)` after the backward pass of optimizer step `step`."""
    original = transformers.Trainer.training_step

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = original(self, model, inputs, num_items_in_batch)
        if self.state.global_step + 1 == step:
            action(self, model)
        return loss

    monkeypatch.setattr(transformers.Trainer, "training_step", training_step)


def killed_at_step_4(synth_data, out, monkeypatch) -> None:
    """A run killed after 3 steps, each saved as a checkpoint."""

    def kill(trainer, model):
        raise Killed

    at_step(4, kill, monkeypatch)
    with pytest.raises(Killed):
        run(synth_data, out)
    monkeypatch.undo()


def nan_gradient(trainer, model):
    next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("nan"))


def nan_weight(trainer, model):
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad)[0].fill_(float("nan"))


def published(out):
    """Every folder the run published: its checkpoints and its model."""
    stage = out / "instruct"
    return sorted(path for path in stage.iterdir() if path.is_dir() and not path.name.startswith("."))


def same(weights: dict, other: dict) -> bool:
    return weights.keys() == other.keys() and all(torch.equal(weights[key], other[key]) for key in weights)


def all_finite(folder) -> bool:
    return all(torch.isfinite(t).all() for f in folder.glob("*.safetensors") for t in load_file(f).values())


def test_a_nan_gradient_with_a_finite_loss_stops_the_run_before_it_reaches_a_weight(
    synth_data, tmp_path, monkeypatch, capsys
):
    at_step(3, nan_gradient, monkeypatch)
    assert run(synth_data, tmp_path) == 2
    assert error_line(capsys) == (
        "sts: error: stage instruct: the gradient is not finite (with a finite loss) at step 3; stopped before "
        "that step changed the weights (stages.N.on_nonfinite_loss: skip drops such steps instead)"
    )
    assert [p.name for p in published(tmp_path)] == ["checkpoint-1", "checkpoint-2"]
    assert all(all_finite(folder) for folder in published(tmp_path))


def test_a_nan_gradient_in_skip_mode_drops_the_step_and_publishes_finite_weights(
    synth_data, tmp_path, monkeypatch, capsys
):
    at_step(3, nan_gradient, monkeypatch)
    assert run(synth_data, tmp_path, "stages.0.on_nonfinite_loss=skip") == 0
    assert "instruct: dropped step(s) [3]" in capsys.readouterr().out
    folders = published(tmp_path)
    assert [p.name for p in folders][-1] == "model" and len(folders) == 7
    assert all(all_finite(folder) for folder in folders)
    step_2, step_3 = (load_file(tmp_path / "instruct" / f"checkpoint-{n}" / "model.safetensors") for n in (2, 3))
    assert same(step_2, step_3), "the dropped step changed nothing"


def test_non_finite_weights_are_never_written(synth_data, tmp_path, monkeypatch, capsys):
    at_step(3, nan_weight, monkeypatch)  # after step 3's gradients: the optimizer step keeps the NaN
    assert run(synth_data, tmp_path, "stages.0.on_nonfinite_loss=skip") == 2
    assert re.fullmatch(
        r"sts: error: stage instruct, step 3: \d[\d,]* of [\d,]+ weights are not finite \(first: \S+\); "
        r"checkpoint-3 was not written",
        error_line(capsys),
    )
    assert [p.name for p in published(tmp_path)] == ["checkpoint-1", "checkpoint-2"]


def test_a_used_output_folder_is_refused_unless_resumed_or_overwritten(synth_data, tmp_path, capsys):
    assert run(synth_data, tmp_path) == 0
    first = load_file(tmp_path / "instruct" / "model" / "model.safetensors")
    capsys.readouterr()

    assert run(synth_data, tmp_path, "stages.0.learning_rate=2e-3") == 2
    assert error_line(capsys).startswith(f"sts: error: output_dir {tmp_path} holds a run's work (instruct);")

    assert run(synth_data, tmp_path, "stages.0.learning_rate=2e-3", "resume=true") == 2
    line = error_line(capsys)
    assert "differs in stages.0.learning_rate (0.001, now 0.002)" in line
    assert same(load_file(tmp_path / "instruct" / "model" / "model.safetensors"), first), "nothing was touched"

    assert run(synth_data, tmp_path, "stages.0.learning_rate=2e-3", "overwrite=true") == 0
    again = load_file(tmp_path / "instruct" / "model" / "model.safetensors")
    assert not same(again, first), "trained anew"
    assert json.loads((tmp_path / "instruct" / "fingerprint.json").read_text())["stages"][0]["learning_rate"] == 2e-3


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ("stages.0.learning_rate=2e-3", "stages.0.learning_rate"),
        ("vtc={strategy: uniform, keep_ratio: 0.5, stages: [instruct]}", "stages.0.sts.vtc"),
        ("seed=1", "seed"),
    ],
)
def test_a_config_changed_between_the_kill_and_the_resume_is_refused_naming_the_key(
    change, key, synth_data, tmp_path, monkeypatch, capsys
):
    killed_at_step_4(synth_data, tmp_path, monkeypatch)
    assert run(synth_data, tmp_path, change, "resume=true") == 2
    assert f"differs in {key}" in error_line(capsys)
    # What only decides how the run is saved and logged may change: the run goes on from step 3.
    assert run(synth_data, tmp_path, "resume=true", "stages.0.save_steps=2", "stages.0.logging_steps=2") == 0
    assert (tmp_path / "instruct" / "model").is_dir()


def staged_replace(tmp_path, point: int):
    """A stage folder whose `model` was being replaced when the run was killed at `point`."""
    stage = tmp_path / "stage"
    (stage / "model").mkdir(parents=True)
    (stage / "model" / "weights").write_text("old")
    (stage / STAGING / "model").mkdir(parents=True)
    (stage / STAGING / "model" / "weights").write_text("new")
    steps = [
        lambda: None,  # 0: killed before the old one was renamed aside
        lambda: (stage / "model").rename(stage / STAGING / f"model{ASIDE}"),  # 1: aside, new not yet in
        lambda: (stage / STAGING / "model").rename(stage / "model"),  # 2: new in, the old not yet deleted
        lambda: shutil.rmtree(stage / STAGING / f"model{ASIDE}"),  # 3: done
    ]
    for step in steps[: point + 1]:
        step()
    return stage


@pytest.mark.parametrize("point", [0, 1, 2, 3])
def test_a_replace_killed_at_any_point_settles_to_a_whole_folder(point, tmp_path):
    stage = staged_replace(tmp_path, point)
    settle(stage)
    assert (stage / "model" / "weights").read_text() == ("old" if point == 0 else "new")
    assert not (stage / STAGING).exists()


def test_replace_folder_leaves_the_new_folder_and_nothing_else(tmp_path):
    stage = staged_replace(tmp_path, 0)
    replace_folder(stage / STAGING / "model", stage / "model")
    assert (stage / "model" / "weights").read_text() == "new" and not (stage / STAGING).exists()


@pytest.mark.parametrize("point", [1, 2])
def test_resume_recognises_a_model_killed_mid_replace(point, synth_data, tmp_path, capsys):
    assert run(synth_data, tmp_path) == 0
    stage = tmp_path / "instruct"
    (stage / STAGING).mkdir()
    shutil.copytree(stage / "model", stage / STAGING / "model")  # the replacement, whole
    if point >= 1:
        (stage / "model").rename(stage / STAGING / f"model{ASIDE}")
    if point >= 2:
        (stage / STAGING / "model").rename(stage / "model")
    capsys.readouterr()
    assert run(synth_data, tmp_path, "resume=true") == 0
    assert "instruct: finished before this run (resume), kept" in capsys.readouterr().out
    assert all_finite(stage / "model") and (stage / "model" / "config.json").exists()
    assert not (stage / STAGING).exists()


def write_recipe(tmp_path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["stages.0.lr_scheduler=bogus"], "at stages.0.lr_scheduler: 'bogus' is not a scheduler sts train can"),
        (["stages.0.lr_scheduler=cosine_with_min_lr"], "'cosine_with_min_lr' is not a scheduler sts train can"),
        (["stages.0.report_to=[bogus]"], "at stages.0.report_to: 'bogus' is not a logger transformers knows"),
        (["stages.0.learning_rate=["], "override 'stages.0.learning_rate=[': its value is not valid YAML"),
        (["stages.0.learning_rate=inf"], "at stages.0.learning_rate: Input should be a finite number"),
        (["stages.0.weight_decay=.inf"], "at stages.0.weight_decay: Input should be a finite number"),
        (["resume=true", "overwrite=true"], "resume=true continues the run in output_dir and overwrite=true deletes"),
    ],
)
def test_config_mistakes_are_one_line_before_any_work(overrides, expected, synth_data, tmp_path, capsys):
    assert run(synth_data, tmp_path / "out", *overrides) == 2
    assert expected in error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_a_python_tag_in_a_recipe_is_one_line_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "ran"
    recipe = write_recipe(tmp_path, f"seed: !!python/object/apply:os.system ['touch {marker}']\n")
    assert main(["train", recipe]) == 2
    assert "is not valid YAML: could not determine a constructor for the tag" in error_line(capsys)
    assert not marker.exists()


def test_an_output_dir_that_is_a_file_is_one_line(synth_data, tmp_path, capsys):
    (tmp_path / "out").write_text("mine")
    assert run(synth_data, tmp_path / "out") == 2
    assert error_line(capsys) == f"sts: error: output_dir {tmp_path / 'out'} is a file, not a folder; name a folder"
    assert (tmp_path / "out").read_text() == "mine"


def test_a_stray_checkpoint_folder_does_not_confuse_resume(synth_data, tmp_path, monkeypatch):
    killed_at_step_4(synth_data, tmp_path, monkeypatch)
    (tmp_path / "instruct" / "checkpoint-old").mkdir()
    assert run(synth_data, tmp_path, "resume=true") == 0
    assert (tmp_path / "instruct" / "checkpoint-old").is_dir(), "the user's folder is left alone"


def test_a_full_or_read_only_output_disk_is_one_line_before_training(synth_data, tmp_path, monkeypatch, capsys):
    from collections import namedtuple

    import sts.cli.runs

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sts.cli.runs.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    assert run(synth_data, tmp_path) == 2
    assert re.fullmatch(
        rf"sts: error: output_dir {tmp_path} has 0\.0 MiB free, less than the [\d.]+ MiB a checkpoint needs; "
        "free some space or choose another output_dir",
        error_line(capsys),
    )
    monkeypatch.undo()

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(sts.cli.runs.tempfile, "TemporaryFile", read_only)
    assert run(synth_data, tmp_path / "out") == 2
    assert error_line(capsys) == (
        f"sts: error: output_dir {tmp_path / 'out'} cannot be written (Read-only file system at {tmp_path}); "
        "choose another output_dir or fix its permissions"
    )
    assert not (tmp_path / "out").exists(), "refused before training"


def test_a_disk_that_fills_up_while_saving_is_one_line(synth_data, tmp_path, monkeypatch, capsys):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", "model.safetensors")

    monkeypatch.setattr(transformers.Trainer, "_save_optimizer_and_scheduler", full)
    assert run(synth_data, tmp_path) == 2
    assert error_line(capsys) == (
        "sts: error: stage instruct, step 1: cannot write model.safetensors (No space left on device); free space "
        "or fix the output folder, then run again with resume=true"
    )
    assert published(tmp_path) == []


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ('{"id": "x", "conversations": [], "n": ' + "1" * 5000 + "}", "cannot be read (Exceeds the limit"),
        ('{"id": "x", "conversations": [], "n": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
        ('{"id": "a\\nsts: error: forged", "conversations": [{"from": "human", "value": ""}]}', "(id 'a\\nsts"),
    ],
)
def test_a_hostile_record_is_one_line(record, problem, synth_data, tmp_path, capsys):
    good = json.loads((synth_data["train"]).read_text())[0]
    data = tmp_path / "data.json"
    data.write_text(f"[{json.dumps(good)}, {record}]")
    for command in (
        ["data", "check", str(data), "--images", str(synth_data["train"].parent)],
        [
            "train",
            "demo",
            *tiny_overrides(synth_data, tmp_path / "out"),
            f"data.train={data}",
            f"data.images={synth_data['train'].parent}",
            "stages.0.data=null",
        ],
    ):
        main(command)
        printed = capsys.readouterr()
        text = printed.out + printed.err
        assert "Traceback" not in text and problem in text
        assert not re.search(r"^sts: error: forged", text, re.M)
    assert re.search(r"^sts: error: .*" + re.escape(problem), printed.err, re.M), "a line of its own, bars or not"
