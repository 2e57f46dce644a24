"""Every example in examples/ runs for a few steps on a tiny model and does what it says."""

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# TRL's SFTTrainer scores its metrics on the sequence it gave the model unless its fused LM head
# (TRL 1.15) scores the labels the model cut: STS in an SFTTrainer needs that TRL.
needs_fused_head = pytest.mark.skipif(
    not hasattr(importlib.import_module("trl.trainer.utils"), "add_fused_lm_head"),
    reason="STS in TRL's SFTTrainer needs TRL 1.15 or newer (its fused LM head)",
)


@pytest.fixture
def example(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))

    def load(name):
        sys.modules.pop(name, None)
        return importlib.import_module(name)

    return load


def test_trainer_example_compresses_and_saves_a_plain_checkpoint(example, tmp_path):
    history = example("trainer").main(["--steps", "6", "--out", str(tmp_path)])
    logged = [line for line in history if "loss" in line]
    assert logged and all(line["sts/lm_seq_len"] < line["sts/input_seq_len"] for line in logged)
    saved = AutoModelForImageTextToText.from_pretrained(tmp_path / "model")
    assert not any("sts" in key for key in saved.state_dict())


def test_plain_loop_example_moves_the_skipper_schedule(example):
    stats = example("plain_loop").main(["--steps", "12"])
    skips = [len(s["skipped_layers"]) for s in stats]
    assert len(stats) == 12 and sum(skips[:6]) > sum(skips[6:]), skips


def test_lora_example_merges_into_a_plain_model(example, tmp_path):
    from sts.cli.models.families import save_tiny

    original = AutoModelForImageTextToText.from_pretrained(
        save_tiny("LlavaForConditionalGeneration", tmp_path / "base")
    )
    history = example("lora").main(["--steps", "6", "--model", str(tmp_path / "base"), "--out", str(tmp_path / "run")])
    assert any(line.get("sts/lm_seq_len", 99) < line.get("sts/input_seq_len", 0) for line in history)
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "run" / "model").state_dict()
    before = original.state_dict()
    assert merged.keys() == before.keys(), "no adapter or STS keys: a plain checkpoint"
    q_proj = next(k for k in before if "language_model" in k and k.endswith("q_proj.weight"))
    k_proj = q_proj.replace("q_proj", "k_proj")
    assert not torch.equal(merged[q_proj], before[q_proj]), "the LoRA update was merged in"
    assert torch.equal(merged[k_proj], before[k_proj]), "modules without an adapter are untouched"


@needs_fused_head
def test_sft_trainer_example_compresses_inside_trls_trainer(example):
    history = example("sft_trainer").main(["--steps", "4"])
    logged = [line for line in history if "loss" in line]
    assert len(logged) == 4 and all(line["sts/lm_seq_len"] < line["sts/input_seq_len"] for line in logged)


@needs_fused_head
def test_sts_wrapped_before_trl_is_a_clear_error_not_a_silent_bypass(example, tmp_path):
    from transformers import AutoProcessor
    from trl import SFTConfig, SFTTrainer

    import sts

    model_path, data = example("_tiny").model_and_data(None, None, tmp_path, "Qwen2_5_VLForConditionalGeneration")
    model = sts.apply_sts(AutoModelForImageTextToText.from_pretrained(model_path), {"vtc": {"strategy": "pool"}})
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(tmp_path / "out"),
            max_steps=2,
            report_to="none",
            per_device_train_batch_size=4,
            bf16=False,
            max_length=None,
        ),
        train_dataset=example("sft_trainer").trl_rows(data),
        processing_class=AutoProcessor.from_pretrained(model_path),
        callbacks=[sts.STSCallback()],
    )
    with pytest.raises(ValueError, match=r"call sts.apply_sts\(trainer.model"):
        trainer.train()


def test_a_callback_with_a_config_attaches_sts_when_training_begins(synth_data, processor, tmp_path):
    """How tools that build the model and the Trainer themselves (LLaMA-Factory, ms-swift) get STS."""
    import sts
    from sts.cli.models.tiny import build_model
    from tests.conftest import TEST_SIZES
    from tests.test_callback import tiny_trainer

    compressor = sts.STSCallback({"vtc": {"strategy": "pool", "keep_ratio": 0.25}})
    model = build_model(TEST_SIZES, seed=0, base=False)
    trainer = tiny_trainer(model, synth_data, processor, tmp_path, [compressor], max_steps=3)
    trainer.train()
    logged = [line for line in trainer.state.log_history if "loss" in line]
    assert len(logged) == 3 and all(line["sts/lm_seq_len"] < line["sts/input_seq_len"] for line in logged)


def stand_in(monkeypatch, name: str, **attributes):
    """A module standing in for a tool that is not installed here, with the entry point sts uses."""
    import types

    for prefix in [name.rsplit(".", depth)[0] for depth in range(name.count("."), 0, -1)]:
        monkeypatch.setitem(sys.modules, prefix, types.ModuleType(prefix))
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    monkeypatch.setitem(sys.modules, name, module)


def test_the_llamafactory_example_hands_its_yaml_and_an_sts_callback_to_run_exp(example, monkeypatch, tmp_path):
    """LLaMA-Factory 0.9.5's entry point: llamafactory.train.tuner.run_exp(args, callbacks)."""
    import sts

    calls = []
    stand_in(monkeypatch, "llamafactory.train.tuner", run_exp=lambda args, callbacks: calls.append((args, callbacks)))
    recipe = tmp_path / "sft.yaml"
    recipe.write_text("model_name_or_path: /models/qwen2.5-vl\nstage: sft\nfinetuning_type: full\n")
    module = example("llamafactory")
    module.main([str(recipe)])
    ((args, callbacks),) = calls
    assert args == {"model_name_or_path": "/models/qwen2.5-vl", "stage": "sft", "finetuning_type": "full"}
    assert [type(c) for c in callbacks] == [sts.STSCallback] and callbacks[0].config == module.STS


def test_the_ms_swift_plugin_registers_an_sts_callback(example, monkeypatch):
    """ms-swift 4.6's plugin contract: swift.callbacks.callbacks_map[name](args, trainer)."""
    import sts

    callbacks_map = {}
    stand_in(monkeypatch, "swift.callbacks", callbacks_map=callbacks_map)
    plugin = example("ms_swift_plugin")
    callback = callbacks_map["sts"](None, None)
    assert isinstance(callback, sts.STSCallback) and callback.config == plugin.DEFAULT
    monkeypatch.setenv("STS_CONFIG", '{"lds": {"alpha": 0.3}}')
    assert callbacks_map["sts"](None, None).config == {"lds": {"alpha": 0.3}}


@pytest.mark.skipif(
    importlib.util.find_spec("swift") is None, reason="ms-swift is installed by `make test-oldest` only"
)
def test_ms_swift_trains_a_tiny_llava_with_sts_compressing(synth_data, tmp_path):
    """`swift sft ... --external_plugins examples/ms_swift_plugin.py --callbacks sts`, as the README says."""
    import json
    import re
    import subprocess

    from sts.cli.models.families import save_tiny

    model = save_tiny("LlavaForConditionalGeneration", tmp_path / "model")
    rows = []
    for record in json.loads(synth_data["train"].read_text())[:16]:
        turns = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                 for t in record["conversations"]]  # fmt: skip
        rows.append({"messages": turns, "images": [str(synth_data["train"].parent / record["image"])]})
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    swift = Path(sys.executable).parent / "swift"
    command = [str(swift), "sft", "--model", str(model), "--model_type", "llava1_5_hf", "--template", "llava1_5_hf",
               "--dataset", str(data), "--external_plugins", str(EXAMPLES / "ms_swift_plugin.py"), "--callbacks",
               "sts", "--tuner_type", "full", "--max_steps", "2", "--per_device_train_batch_size", "2",
               "--gradient_accumulation_steps", "1", "--logging_steps", "1", "--output_dir", str(tmp_path / "out"),
               "--report_to", "none", "--save_strategy", "no", "--torch_dtype", "float32"]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    kept = [int(n) for n in re.findall(r"'sts/visual_tokens_kept': (\d+)", run.stdout + run.stderr)]
    visual = [int(n) for n in re.findall(r"'sts/visual_tokens_in': (\d+)", run.stdout + run.stderr)]
    assert len(kept) == 2 and all(k * 4 == v for k, v in zip(kept, visual)), (kept, visual)  # pool, a quarter
