"""STS in a user's own `transformers.Trainer`: `apply_sts` plus `callbacks=[STSCallback()]`."""

import pytest
import torch
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

import sts
from sts.cli.data.collate import Collator
from sts.cli.data.dataset import LlavaDataset
from sts.cli.models.tiny import build_model
from sts.patch import drain_stats, state_of
from tests.conftest import TEST_SIZES


def tiny_trainer(model, synth_data, processor, out, callbacks, **arguments) -> Trainer:
    """A Trainer as a user builds one, on the synthetic data; `arguments` add to or replace the defaults."""
    defaults = dict(per_device_train_batch_size=4, logging_steps=1, report_to="none", save_strategy="no")
    args = TrainingArguments(
        output_dir=str(out), remove_unused_columns=False, use_cpu=True, **{**defaults, **arguments}
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=LlavaDataset(synth_data["train"], processor),
        data_collator=Collator(processor.tokenizer.pad_token_id),
        callbacks=callbacks,
    )


def test_a_plain_trainer_with_the_callback_runs_the_schedule(synth_data, processor, tmp_path):
    model = build_model(TEST_SIZES, seed=0, base=False)
    sts.apply_sts(
        model,
        {
            "vtc": {"strategy": "pool", "keep_ratio": 0.25},
            "lds": {"alpha": 1.0, "epsilon": 0.0, "protect_first": 0, "protect_last": 0},
        },
    )
    trainer = tiny_trainer(
        model,
        synth_data,
        processor,
        tmp_path,
        [sts.STSCallback()],
        gradient_accumulation_steps=2,
        max_steps=8,
        learning_rate=1e-4,
    )
    trainer.train()

    forwards = drain_stats(model)
    assert len(forwards) == 8 * 2, "one record per micro-batch"
    assert all(f["lm_seq_len"] < f["input_seq_len"] for f in forwards), "the compressor cut every forward"
    skips = [len(f["skipped_layers"]) for f in forwards]
    assert sum(skips[:8]) > sum(skips[8:]), f"skipping fades as the run progresses: {skips}"
    pairs = [(a["skipped_layers"], b["skipped_layers"]) for a, b in zip(forwards[::2], forwards[1::2])]
    assert any(a != b for a, b in pairs), "the micro-batches of a step draw their own skips"
    logged = [line for line in trainer.state.log_history if "loss" in line]
    assert len(logged) == 8 and all(line["sts/lm_seq_len"] < line["sts/input_seq_len"] for line in logged)
    # Each line covers its window: one step of two micro-batches of four samples.
    assert all(line["sts/forwards"] == 2 and line["sts/samples"] == 8 for line in logged)
    assert all(line["sts/visual_tokens_kept"] < line["sts/visual_tokens_in"] for line in logged)


def test_a_resumed_run_resumes_the_schedule():
    model = build_model(TEST_SIZES, seed=0, base=False)
    sts.apply_sts(model, {"lds": {}})
    state = TrainerState(global_step=600, max_steps=800)  # as restored from a checkpoint
    sts.STSCallback().on_step_begin(None, state, TrainerControl(), model=model)
    assert state_of(model).progress == 0.75


@pytest.mark.parametrize("deep_cuts", [[], [[0.5, 0.5]]])
def test_a_fused_lm_head_scores_the_cut_labels_as_sts_does(synth_data, processor, deep_cuts):
    """TRL's fused LM head computes the loss inside the forward from the labels it was given:
    STS cuts them in place (again at a deep cut), and the loss is the one STS computes itself."""
    add_fused_lm_head = getattr(pytest.importorskip("trl.trainer.utils"), "add_fused_lm_head", None)
    if add_fused_lm_head is None:
        pytest.skip("this TRL has no fused LM head (TRL 1.15 has)")

    from sts.cli.data.collate import Collator
    from sts.cli.data.dataset import LlavaDataset

    dataset = LlavaDataset(synth_data["train"], processor)
    batch = Collator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(4)])
    model = build_model(TEST_SIZES, seed=0, base=False).train()
    compressor = {"vtc": {"strategy": "pool", "keep_ratio": 0.25, "deep_cuts": deep_cuts}}
    sts.apply_sts(model, compressor)
    own = model(**{k: v.clone() for k, v in batch.items()}).loss
    sts.remove_sts(model)

    add_fused_lm_head(model)
    sts.apply_sts(model, compressor)
    fused = model(**{k: v.clone() for k, v in batch.items()}, fused_lm_head=True)
    assert sts.step_stats(model)["lm_seq_len"] < batch["input_ids"].shape[1]
    assert torch.allclose(fused.loss, own, atol=1e-5)


def test_loggers_see_the_stats_when_the_callback_goes_first(synth_data, processor, tmp_path):
    """report_to's loggers come before user callbacks, so STSCallback must be put ahead of them."""
    from transformers import TrainerCallback

    class Logger(TrainerCallback):  # stands for TensorBoard / W&B, which read `logs` when called
        def __init__(self):
            self.seen = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:
                self.seen.append(dict(logs))

    def train(sts_first: bool) -> list[dict]:
        model = sts.apply_sts(build_model(TEST_SIZES, seed=0, base=False), {"vtc": {"strategy": "pool"}})
        trainer = tiny_trainer(
            model, synth_data, processor, tmp_path, None if sts_first else [sts.STSCallback()], max_steps=2
        )
        logger = Logger()
        trainer.callback_handler.callbacks.insert(1, logger)  # where report_to puts its loggers
        if sts_first:
            sts.STSCallback.add_to(trainer)  # as the README says
        trainer.train()
        return logger.seen

    assert not any("sts/lm_seq_len" in line for line in train(sts_first=False))
    first = train(sts_first=True)
    assert len(first) == 2 and all("sts/lm_seq_len" in line for line in first)


def test_the_callback_warns_when_report_to_loggers_would_miss_its_stats(caplog):
    args = TrainingArguments(output_dir="unused", report_to="none")
    sts.STSCallback().on_train_begin(args, None, None)
    assert "add_to" not in caplog.text
    args.report_to = ["tensorboard"]
    sts.STSCallback().on_train_begin(args, None, None)
    assert "add_to" in caplog.text
    caplog.clear()
    trainer = type("Trainer", (), {"callback_handler": type("Handler", (), {"callbacks": [sts.STSCallback()]})()})()
    sts.STSCallback.add_to(trainer).on_train_begin(args, None, None)
    assert "add_to" not in caplog.text and len(trainer.callback_handler.callbacks) == 1


def batch_of(synth_data, processor, size: int = 2) -> dict:
    dataset = LlavaDataset(synth_data["train"], processor)
    return Collator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(size)])


def test_a_peft_model_takes_sts_on_the_model_it_wraps(synth_data, processor):
    from peft import LoraConfig, get_peft_model

    model = build_model(TEST_SIZES, seed=0, base=False)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=r".*language_model.*\.(q|v)_proj"))
    assert sts.apply_sts(lora, {"vtc": {"strategy": "pool", "keep_ratio": 0.25}}) is lora
    lora.train()
    sts.set_progress(lora, 0, 10)
    lora(**batch_of(synth_data, processor)).loss.backward()
    stats = sts.step_stats(lora)
    assert stats["lm_seq_len"] < stats["input_seq_len"], "the compressor cut the wrapped model's sequence"
    assert any(p.grad is not None for n, p in lora.named_parameters() if "lora_" in n)
    sts.remove_sts(lora)
    assert "forward" not in vars(model), "the wrapped model is untouched again"


def test_training_that_never_reports_progress_warns_once(synth_data, processor):
    import warnings

    batch = batch_of(synth_data, processor)
    model = sts.apply_sts(build_model(TEST_SIZES, seed=0, base=False), {"lds": {}})
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            model(**batch)
    assert [str(w.message) for w in caught if "without progress" in str(w.message)] == [
        "sts: training runs without progress (no sts.STSCallback in the Trainer, no sts.set_progress in the loop): "
        "the skipper stays at its peak rate and the compressor's schedules never move"
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(4):
            sts.set_progress(model, step, 4)
            model(**batch)
    assert not [w for w in caught if "without progress" in str(w.message)]


def test_image_tokens_without_pixels_name_the_cause(synth_data, processor):
    batch = batch_of(synth_data, processor)
    del batch["pixel_values"]
    model = sts.apply_sts(build_model(TEST_SIZES, seed=0, base=False), {"vtc": {"strategy": "uniform"}})
    model.train()
    with pytest.raises(ValueError, match="holds 128 image tokens but the model computed no image features: pass"):
        model(**batch)
