"""Data-parallel training on 2 CPU processes (gloo): DDP and DeepSpeed ZeRO-2/3 through `sts
train`, FSDP2 through a plain loop (accelerate runs FSDP on GPUs only). Every launch is bounded by a timeout, so a hang
fails the test instead of blocking it."""

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText

from sts.cli.models.tiny import build_model
from sts.cli.recipes import ConfigError
from sts.cli.train import engine_arguments
from tests.traced_run import SIZES, launch, recipe


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """A saved model's weights, as a single process of plain transformers loads them."""
    return AutoModelForImageTextToText.from_pretrained(folder).state_dict()


def assert_close(first: dict, second: dict, tolerance: float = 1e-4) -> None:
    assert first.keys() == second.keys()
    worst = max((first[key] - second[key]).abs().max().item() for key in first)
    assert worst <= tolerance, f"weights differ by {worst}"


def assert_ranks_agree(traces: list[list[dict]]) -> None:
    """Every rank ran the same forwards: the same layers skipped, as many visual tokens kept."""
    forwards = [[forward for step in trace for forward in step["forwards"]] for trace in traces]
    assert forwards[0] and all(f == forwards[0] for f in forwards)


def test_ddp_on_two_processes_trains_as_one_process_with_accumulation(synth_data, tmp_path):
    compressor_only = ["vtc.strategy=uniform", "lds=null"]
    traces = launch(2, tmp_path / "two", *recipe(synth_data, tmp_path / "two", *compressor_only))
    launch(
        1,
        tmp_path / "one",
        *recipe(
            synth_data,
            tmp_path / "one",
            *compressor_only,
            "stages.0.gradient_accumulation_steps=2",
            "stages.1.gradient_accumulation_steps=2",
        ),
    )
    assert_ranks_agree(traces)
    assert any(forward["visual_tokens_kept"] < 4 * 64 for step in traces[0] for forward in step["forwards"])
    for stage in ("align", "instruct"):
        assert_close(weights(tmp_path / "two" / stage / "model"), weights(tmp_path / "one" / stage / "model"))


def test_ddp_ranks_skip_the_same_layers_in_every_micro_batch(synth_data, tmp_path):
    traces = launch(
        2,
        tmp_path,
        *recipe(
            synth_data,
            tmp_path / "run",
            "lds.alpha=0.9",
            "stages.1.max_steps=4",
            "stages.1.gradient_accumulation_steps=2",
            "stages.1.save_steps=2",
        ),
    )
    assert_ranks_agree(traces)
    assert all(len(step["forwards"]) == 2 for step in traces[0][2:])
    assert any(forward["skipped_layers"] for step in traces[0] for forward in step["forwards"])
    initial = build_model(SIZES, seed=0, base=False).state_dict()
    for folder in (tmp_path / "run" / "instruct" / "model", tmp_path / "run" / "instruct" / "checkpoint-2"):
        saved = weights(folder)
        assert saved.keys() == initial.keys()


def test_fsdp_on_two_processes_trains_as_one_process_with_accumulation(synth_data, tmp_path):
    traces = launch(2, tmp_path / "two", "fsdp", str(synth_data["train"]), "3", "1", "no-skipper")
    launch(1, tmp_path / "one", "fsdp", str(synth_data["train"]), "3", "2", "no-skipper")
    assert_ranks_agree(traces)
    trained, reference = weights(tmp_path / "two" / "model"), weights(tmp_path / "one" / "model")
    assert_close(trained, reference)
    initial = build_model(SIZES, seed=0, base=False).state_dict()
    assert not torch.equal(trained["lm_head.weight"], initial["lm_head.weight"]), "the sharded run trained"


def assert_only_layers_run_are_gathered(steps: list[dict]) -> None:
    """At every step, the decoder layers whose parameters were gathered are exactly those not
    skipped; and some step skipped a layer."""
    for step in steps:
        skipped = set(step["forwards"][0]["skipped_layers"])
        gathered = {
            int(found.group(1))
            for name in step["gathered"]
            if (found := re.search(r"language_model\.layers\.(\d+)", str(name)))
        }
        assert gathered == set(range(SIZES.text_layers)) - skipped, f"step {step['step']}"
    assert any(step["forwards"][0]["skipped_layers"] for step in steps)


def test_fsdp_never_gathers_a_skipped_layer(synth_data, tmp_path):
    traces = launch(2, tmp_path, "fsdp", str(synth_data["train"]), "4", "1", "skipper")
    assert_ranks_agree(traces)
    assert_only_layers_run_are_gathered(traces[0])


@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_deepspeed_zero_trains_with_the_skipper_on(engine, synth_data, tmp_path):
    traces = launch(
        2,
        tmp_path,
        *recipe(
            synth_data,
            tmp_path / "run",
            f"distributed={engine}",
            "lds.alpha=0.9",
            "stages.1.max_steps=4",
            "stages.1.save_steps=2",
        ),
    )
    assert_ranks_agree(traces)
    if engine == "zero3":  # the shipped config does not prefetch: prefetching follows the last step's layers
        assert_only_layers_run_are_gathered(traces[0][2:])  # instruction tuning, after alignment's 2 steps
    initial = build_model(SIZES, seed=0, base=False).state_dict()
    for folder in ("model", "checkpoint-2"):  # the model, and a checkpoint saved while training
        trained = weights(tmp_path / "run" / "instruct" / folder)
        assert trained.keys() == initial.keys()
        assert not torch.equal(trained["lm_head.weight"], initial["lm_head.weight"])


def test_log_lines_of_a_distributed_run_name_their_rank(monkeypatch):
    import logging

    from transformers.utils import logging as hf_logging

    from sts.cli.distributed import label_logs_with_rank

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    handler = hf_logging.get_logger().handlers[0]
    monkeypatch.setattr(handler, "formatter", handler.formatter)  # restored after the test
    label_logs_with_rank()
    line = logging.LogRecord("transformers.trainer", logging.WARNING, __file__, 1, "saving", None, None)
    assert handler.format(line) == "[rank 1] WARNING transformers.trainer: saving"


def test_engines_that_cannot_run_here_are_refused_in_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = build_model(SIZES, seed=0, base=False)
    with pytest.raises(ConfigError, match="distributed: fsdp"):
        engine_arguments("fsdp", None, model, unused_parameters=False)
    assert engine_arguments("ddp", None, model, unused_parameters=True)["ddp_find_unused_parameters"]
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="needs DeepSpeed"):
        engine_arguments("zero3", None, model, unused_parameters=False)


def test_an_engine_applies_to_a_launched_process_even_alone(monkeypatch):
    """Without a launcher a run is plain; torchrun's one process gets the engine (FSDP on one GPU)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = build_model(SIZES, seed=0, base=False)
    assert "fsdp" not in engine_arguments("fsdp", None, model, unused_parameters=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert engine_arguments("fsdp", None, model, unused_parameters=False)["fsdp_config"]["version"] == 2
