import copy
import json
import subprocess
import sys

import pytest
import torch

import sts
from sts.cli.data.collate import Collator
from sts.cli.data.dataset import LlavaDataset
from sts.cli.models.tiny import build_model
from sts.compat import set_activation_checkpointing
from sts.config import LDSConfig
from sts.lds import draw_skips, skip_probability
from tests.conftest import TEST_SIZES

LAYERS = 8


@pytest.fixture
def model():
    sizes = TEST_SIZES.model_copy(update={"text_layers": LAYERS})
    return build_model(sizes, seed=4, base=False).train()


@pytest.fixture(scope="module")
def batch(synth_data, processor):
    dataset = LlavaDataset(synth_data["train"], processor)
    return Collator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(3)])


def test_schedule_is_the_papers_formula():
    cfg = LDSConfig(alpha=0.6, epsilon=0.5, protect_first=0, protect_last=0)
    for layer in range(LAYERS):
        for progress in (0.0, 0.3, 0.9):
            expected = 0.6 * (1 - progress) ** 2 * (1 + 0.5 * (2 * layer - (LAYERS - 1)) / (LAYERS - 1))
            assert skip_probability(layer, LAYERS, progress, cfg) == pytest.approx(expected)
    protected = LDSConfig(alpha=0.6, protect_first=2, protect_last=1)
    assert [skip_probability(layer, LAYERS, 0.0, protected) > 0 for layer in range(LAYERS)] == [False] * 2 + [
        True
    ] * 5 + [False]
    assert skip_probability(LAYERS - 2, LAYERS, 0.0, LDSConfig(alpha=1.0, epsilon=1.0)) == 1.0  # clipped


@pytest.mark.parametrize("progress", [0.0, 0.25, 0.6])
def test_empirical_skip_frequency_matches_the_schedule(progress):
    cfg = LDSConfig(alpha=0.7, epsilon=0.5, protect_first=1, protect_last=1)
    draws = 3000
    counts = torch.zeros(LAYERS)
    for micro_batch in range(draws):
        for layer in draw_skips(LAYERS, progress, step=17, micro_batch=micro_batch, cfg=cfg, seed=0):
            counts[layer] += 1
    for layer in range(LAYERS):
        p = skip_probability(layer, LAYERS, progress, cfg)
        tolerance = 4 * (p * (1 - p) / draws) ** 0.5 + 1e-9
        assert abs(counts[layer] / draws - p) <= tolerance, (layer, counts[layer] / draws, p)


def count_layer_calls(model):
    calls = [0] * LAYERS
    for i, layer in enumerate(model.model.language_model.layers):
        layer.register_forward_pre_hook(lambda module, args, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def test_skipped_layers_are_never_entered_and_get_no_gradient(model, batch):
    calls = count_layer_calls(model)
    sts.apply_sts(model, {"lds": {"alpha": 0.6, "epsilon": 0.5}})
    sts.set_progress(model, 0, 100)
    model(**batch).loss.backward()
    skipped = sts.step_stats(model)["skipped_layers"]
    assert skipped, "alpha=0.6 at progress 0 should skip something on this seed"
    assert calls == [0 if i in skipped else 1 for i in range(LAYERS)]
    for i, layer in enumerate(model.model.language_model.layers):
        for name, param in layer.named_parameters():
            assert (param.grad is None) == (i in skipped), (i, name)
    assert len(model.model.language_model.layers) == LAYERS, "every layer is back after the step"


DRAW_IN_ANOTHER_PROCESS = """
import json, sys
from sts.config import LDSConfig
from sts.lds import draw_skips
cfg = LDSConfig(alpha=0.5, epsilon=0.5)
print(json.dumps([draw_skips(8, step / 40, step, micro, cfg, seed=11) for step in range(40) for micro in range(2)]))
"""


def test_two_processes_with_the_same_seed_draw_the_same_skips():
    here = [
        draw_skips(8, step / 40, step, micro, LDSConfig(alpha=0.5, epsilon=0.5), seed=11)
        for step in range(40)
        for micro in range(2)
    ]
    there = json.loads(
        subprocess.run(
            [sys.executable, "-c", DRAW_IN_ANOTHER_PROCESS], check=True, capture_output=True, text=True
        ).stdout
    )
    assert here == there and any(here)
    other_seed = [
        draw_skips(8, step / 40, step, micro, LDSConfig(alpha=0.5, epsilon=0.5), seed=12)
        for step in range(40)
        for micro in range(2)
    ]
    assert other_seed != here


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(model, batch):
    checkpointed = copy.deepcopy(model)
    set_activation_checkpointing(checkpointed)
    results = []
    for m in (model, checkpointed):
        sts.apply_sts(m, {"lds": {"alpha": 0.6}})
        sts.set_progress(m, 3, 100)
        results.append(loss_and_grads(m, batch) + (sts.step_stats(m)["skipped_layers"],))
    (loss_a, grads_a, skipped_a), (loss_b, grads_b, skipped_b) = results
    assert skipped_a == skipped_b and skipped_a
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-5), name


def test_eval_runs_every_layer_and_matches_the_unpatched_model(model, batch):
    model.eval()
    with torch.no_grad():
        reference = model(**batch).logits
        calls = count_layer_calls(model)
        sts.apply_sts(model, {"lds": {"alpha": 1.0, "epsilon": 0.0, "protect_first": 0, "protect_last": 0}})
        patched = model(**batch).logits
    assert torch.equal(patched, reference) and calls == [1] * LAYERS


def test_alpha_zero_trains_exactly_like_the_unpatched_model(model, batch):
    reference = loss_and_grads(model, batch)
    sts.apply_sts(model, {"lds": {"alpha": 0.0}})
    patched = loss_and_grads(model, batch)
    assert torch.equal(patched[0], reference[0])
    assert patched[1].keys() == reference[1].keys()
    assert all(torch.equal(patched[1][n], reference[1][n]) for n in reference[1])
    assert sts.step_stats(model)["skipped_layers"] == []


def test_expected_skips_is_the_mean_of_the_draws_over_a_run():
    from sts.lds import expected_skips

    cfg = LDSConfig(alpha=0.9, epsilon=0.8)  # clipped at the deepest layers early in the run
    steps = 4000
    drawn = sum(len(draw_skips(LAYERS, step / steps, step, 0, cfg, seed=3)) for step in range(steps)) / steps
    assert drawn == pytest.approx(expected_skips(LAYERS, cfg), rel=0.03)
