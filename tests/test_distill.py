"""Full-token self-distillation (`vtc.self_distillation`, DualSpeed's slow mode): on a full-token step
the compressed forward runs first without gradient, and the full-token forward's loss gains the KL
divergence from its answer-token predictions; compressed steps are untouched."""

import copy

import pytest
import torch
import torch.nn.functional as F

import sts
from sts.cli.flops import Shapes, recipe_flops, train_step_flops
from sts.cli.models.tiny import build_model
from sts.cli.recipes import ConfigError, load_recipe
from sts.cut import IGNORE_INDEX
from sts.patch import drain_stats
from tests.conftest import TEST_SIZES

COMPRESSOR = {"strategy": "pool", "keep_ratio": 0.25}
# Progress 0.9 of a stage whose last half is on full tokens: a full-token step, by rule not by draw.
DISTILLED = {**COMPRESSOR, "full_tokens_final_fraction": 0.5, "self_distillation": 0.7}


def language_model_lengths(model) -> list[int]:
    """The sequence length the language model receives, call by call."""
    lengths = []
    model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    return lengths


def answer_rows(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return logits[:, :-1][labels[:, 1:] != IGNORE_INDEX]


def compressed_answer_logits(model, batch) -> torch.Tensor:
    """What the compressed forward (a compressed step's) predicts for the answer tokens, read where its
    loss reads them: the model's own cut logits and labels."""
    model = sts.apply_sts(copy.deepcopy(model), {"vtc": COMPRESSOR})
    seen = {}
    original = model.loss_function
    model.loss_function = lambda logits, labels, **kw: (
        seen.update(logits=logits, labels=labels) or original(logits, labels, **kw)
    )
    with torch.no_grad():
        model(**batch)
    return answer_rows(seen["logits"], seen["labels"])


@pytest.mark.parametrize("pack", [False, True])
def test_a_full_token_step_adds_the_compressed_forwards_kl_to_its_loss(model, batch, pack):
    teacher = compressed_answer_logits(model, batch)
    plain = copy.deepcopy(model)(**batch)
    student = answer_rows(plain.logits, batch["labels"])
    sts.apply_sts(model, {"vtc": DISTILLED, "pack": pack})
    sts.set_progress(model, 90, 100)
    distilled = model(**batch).loss

    kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), reduction="sum", log_target=True)
    term = 0.7 * kl / len(student)
    assert term > 1e-5  # the two modes disagree, so the term is not nothing
    assert torch.allclose(distilled, plain.loss + term, rtol=0, atol=1e-6)


def test_the_teacher_runs_first_compressed_and_without_gradient(model, batch):
    lengths = language_model_lengths(model)
    sts.apply_sts(model, {"vtc": DISTILLED})
    sts.set_progress(model, 90, 100)
    model(**batch).loss.backward()
    full = batch["input_ids"].shape[1]
    assert len(lengths) == 2 and lengths[0] < lengths[1] == full
    forward = drain_stats(model)[-1]
    assert forward["lm_seq_len"] == full and forward["teacher"]["lm_seq_len"] == lengths[0]


def test_compressed_steps_run_no_teacher(model, batch):
    lengths = language_model_lengths(model)
    sts.apply_sts(model, {"vtc": DISTILLED})
    sts.set_progress(model, 10, 100)
    model(**batch)
    assert len(lengths) == 1 and lengths[0] < batch["input_ids"].shape[1]
    assert drain_stats(model)[-1]["teacher"] is None


def test_gradients_come_from_the_full_token_forward_only(model, batch):
    sts.apply_sts(model, {"vtc": DISTILLED})
    sts.set_progress(model, 90, 100)
    model(**batch).loss.backward()
    distilled = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    teacher = compressed_answer_logits(model, batch)
    plain = copy.deepcopy(model)
    plain.zero_grad()
    output = plain(**batch)
    student = answer_rows(output.logits, batch["labels"])
    kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), reduction="sum", log_target=True)
    (output.loss + 0.7 * kl / len(student)).backward()
    for name, param in plain.named_parameters():
        if param.grad is not None:
            assert torch.allclose(distilled[name], param.grad, atol=1e-6), name


def test_a_fused_head_is_refused_in_one_line(model, batch):
    sts.apply_sts(model, {"vtc": DISTILLED})
    sts.set_progress(model, 90, 100)
    with pytest.raises(ValueError, match="self_distillation needs the model's logits"):
        model(**batch, fused_lm_head=True)


def test_distillation_without_full_token_steps_is_a_config_error():
    with pytest.raises(ConfigError, match="self_distillation needs full-token steps"):
        load_recipe("demo", ["stages.1.vtc={strategy: pool, self_distillation: 1.0}"])


def test_the_teachers_forward_is_counted_in_the_recipes_flops():
    """A teacher forward costs a compressed forward with no backward, on each full-token step."""
    base = ["vtc=null", "lds=null", "stages.1.vtc={strategy: pool, keep_ratio: 0.25, full_tokens_random_fraction: 0.2"]
    plain, distilled = (
        load_recipe("demo", [base[0], base[1], base[2] + extra + "}"]) for extra in ("", ", self_distillation: 1.0")
    )
    config = build_model(TEST_SIZES, seed=0, base=False).config
    data = {"align": (100, 20), "instruct": (100, 30)}
    extra = recipe_flops(distilled, config, data, [1, 1])[1] - recipe_flops(plain, config, data, [1, 1])[1]
    shapes, side = Shapes.of(config), TEST_SIZES.image_size // TEST_SIZES.patch_size
    frozen = dict.fromkeys(("vision_tower", "projector", "language_model"), False)
    teacher = sum(train_step_flops(shapes, 1, 30 + side * side // 4, 1, frozen).values())
    assert extra == pytest.approx(100 * 0.2 * teacher)
