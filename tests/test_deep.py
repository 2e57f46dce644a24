"""In-decoder progressive compression (`vtc.deep_cuts`, `sts.deep`): from a layer on, the language
model reads only some of each image's tokens, and reads them as a decoder given only those tokens
would (same positions, same attention), with every label in its place."""

import copy

import pytest
import torch
from pydantic import ValidationError

import sts
from sts.cli.data.collate import Collator
from sts.cli.data.dataset import LlavaDataset
from sts.cli.models.tiny import build_model
from sts.config import VTCConfig
from sts.cut import proportional_mask
from sts.deep import DeepCut
from tests.conftest import TEST_SIZES

LAYERS = 4
POOLED = (TEST_SIZES.image_size // TEST_SIZES.patch_size) ** 2 // 4  # visual tokens after 2x2 pooling


@pytest.fixture
def model():
    return build_model(TEST_SIZES.model_copy(update={"text_layers": LAYERS}), seed=3, base=False).train()


@pytest.fixture(scope="module")
def batch(synth_data, processor):
    """Four samples of ragged lengths (padded), the third without its image."""
    dataset = LlavaDataset(synth_data["train"], processor)
    samples = [dataset[i] for i in range(4)]
    samples[1] = {**samples[1], "input_ids": samples[1]["input_ids"][:-8], "labels": samples[1]["labels"][:-8]}
    text_only = samples[2]["input_ids"] != processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    samples[2] = {key: samples[2][key][text_only] for key in ("input_ids", "labels")}  # and no pixels
    return Collator(processor.tokenizer.pad_token_id)(samples)


def deep_recipe(ratio: float = 0.5, strategy: str = "uniform", **vtc) -> dict:
    return {
        "vtc": {
            "strategy": "pool",
            "keep_ratio": 0.25,
            "deep_cuts": [[0.5, ratio]],
            "deep_strategy": strategy,
            **vtc,
        }
    }


def language_model_io(model) -> dict:
    """What the language model receives (after STS's cut) and returns, on its last call."""
    seen = {}
    language_model = model.model.language_model
    language_model.register_forward_pre_hook(lambda m, a, kw: seen.update(inputs=kw), with_kwargs=True)
    language_model.register_forward_hook(lambda m, a, out: seen.update(output=out.last_hidden_state))
    return seen


def run_layers(language_model, layers, **inputs) -> torch.Tensor:
    """The language model's own forward through `layers` only (no final norm unless it is the end)."""
    all_layers, norm = language_model.layers, language_model.norm
    language_model.layers = torch.nn.ModuleList(layers)
    if layers[-1] is not all_layers[-1]:
        language_model.norm = torch.nn.Identity()
    try:
        return language_model(**inputs).last_hidden_state
    finally:
        language_model.layers, language_model.norm = all_layers, norm


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("proportional", [False, True])
def test_deep_layers_read_the_kept_tokens_as_a_decoder_given_only_them_would(model, batch, attention, proportional):
    """Reference: the first half of the decoder on every token; then the kept positions alone, handed
    to transformers' own forward with their position ids and padding mask, through the second half."""
    model.set_attn_implementation(attention)
    seen = language_model_io(model)
    sts.apply_sts(model, deep_recipe(proportional_attention=proportional))
    sts.set_progress(model, 0, 10)
    with torch.no_grad():
        model(**batch)
    received, output = seen["inputs"], seen["output"]
    assert sts.step_stats(model)["deep_seq_lens"] == [(LAYERS // 2, output.shape[1])]
    sts.remove_sts(model)

    language_model, layers = model.model.language_model, list(model.model.language_model.layers)
    real = received["inputs_embeds"].new_ones(received["position_ids"].shape, dtype=torch.bool)
    if received["attention_mask"].dim() == 2:
        real = received["attention_mask"].bool()
    else:  # eager's proportional mask: a position is real where the last query may read it
        real = received["attention_mask"][:, 0, -1] > torch.finfo(received["attention_mask"].dtype).min
    bias = received.get("sts_key_bias")
    with torch.no_grad():
        middle = run_layers(language_model, layers[: LAYERS // 2], **received)
        image = model.config.image_token_id
        kept = []
        for row in range(len(middle)):
            # The uniform deep cut keeps every other pooled token of each image: the evenly spaced half.
            positions = real[row].nonzero().flatten()
            visual = (batch["input_ids"][row] == image).any()
            first_visual = int((batch["input_ids"][row] == image).nonzero()[0]) if visual else None
            pooled = [p for p in positions.tolist() if visual and first_visual <= p < first_visual + POOLED]
            dropped = set(pooled[0::2])  # evenly_spaced(8, 16) keeps the odd ones
            kept.append(torch.tensor([p for p in positions.tolist() if p not in dropped]))
        length = max(len(k) for k in kept)
        index = torch.stack([torch.nn.functional.pad(k, (0, length - len(k))) for k in kept])
        padding = torch.stack([torch.arange(length) < len(k) for k in kept])
        inputs = {
            "inputs_embeds": middle.gather(1, index[..., None].expand(-1, -1, middle.shape[-1])),
            "position_ids": received["position_ids"].gather(1, index),
            "attention_mask": padding.long(),
        }
        if proportional and attention == "eager":
            sizes = received["attention_mask"][:, 0, -1].exp().gather(1, index)  # eager carries the sizes as a bias
            inputs["attention_mask"] = proportional_mask(padding, sizes.round().masked_fill(~padding, 1), middle.dtype)
        elif proportional:
            inputs["sts_key_bias"] = bias.gather(1, index)
        reference = run_layers(language_model, layers[LAYERS // 2 :], **inputs)
    assert output.shape == reference.shape
    assert torch.allclose(output[padding], reference[padding], atol=1e-5)


def test_a_deep_cut_keeping_everything_is_the_loss_without_one(model, batch):
    losses = {}
    for name, recipe in {"none": deep_recipe(), "all": deep_recipe(ratio=1.0)}.items():
        if name == "none":
            recipe["vtc"].pop("deep_cuts")
        patched = sts.apply_sts(copy.deepcopy(model), recipe)
        sts.set_progress(patched, 0, 10)
        losses[name] = patched(**batch).loss
    assert torch.allclose(losses["none"], losses["all"], atol=1e-6)


def test_deep_cuts_train_every_part_score_every_answer_and_leave_the_model_as_it_was(model, batch):
    keys = list(model.state_dict())
    layer_types = [type(layer) for layer in model.model.language_model.layers]
    scored = {}
    for ratio in (1.0, 0.25):
        patched = sts.apply_sts(copy.deepcopy(model), deep_recipe(ratio=ratio))
        sts.set_progress(patched, 0, 10)
        seen = []
        patched.loss_function = lambda logits, labels, **kwargs: seen.append(labels) or logits.sum()
        patched(**batch)
        scored[ratio] = seen[0]
    # The same answer tokens are scored, in the same order, however many visual tokens were dropped.
    assert scored[0.25].shape[1] < scored[1.0].shape[1]
    assert [row[row != -100].tolist() for row in scored[0.25]] == [row[row != -100].tolist() for row in scored[1.0]]

    sts.apply_sts(model, deep_recipe(ratio=0.25))
    sts.set_progress(model, 0, 10)
    model(**batch).loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    assert all(layer.self_attn.q_proj.weight.grad.abs().sum() > 0 for layer in model.model.language_model.layers)
    assert [type(layer) for layer in model.model.language_model.layers] == layer_types
    assert list(model.state_dict()) == keys


def test_a_skipped_cut_layer_still_cuts(model, batch):
    recipe = deep_recipe() | {"lds": {"alpha": 1.0, "epsilon": 0.0, "protect_first": 0, "protect_last": 0}}
    sts.apply_sts(model, recipe)
    sts.set_progress(model, 0, 10)
    model(**batch).loss.backward()
    stats = sts.step_stats(model)
    assert LAYERS // 2 in stats["skipped_layers"]
    assert stats["deep_seq_lens"][0][1] < stats["lm_seq_len"]


def test_text_guided_keeps_the_tokens_most_like_the_last_prompt_token():
    """One row: text, an 8-token image at positions 2-9, text; the answer starts at position 12, so
    position 11 asks. Tokens 4 and 7 carry its direction. A second row is text only, 6 tokens long."""
    hidden = torch.randn(2, 13, 8, generator=torch.Generator().manual_seed(0))
    hidden[0, [4, 7]] = hidden[0, 11] * 3
    visual = torch.zeros(2, 13, dtype=torch.bool)
    visual[0, 2:10] = True
    real = torch.ones(2, 13, dtype=torch.bool)
    real[1, 6:] = False
    labels = torch.full((2, 13), -100)
    labels[0, 12] = 5
    deep = DeepCut([(1, 0.25)], "text_guided", visual, real, labels, "sdpa")
    cut = deep.cut(1, hidden)
    assert deep.keep.tolist() == [[0, 1, 4, 7, 10, 11, 12], [0, 1, 2, 3, 4, 5, -1]]
    assert torch.equal(cut[0], hidden[0, [0, 1, 4, 7, 10, 11, 12]])
    assert torch.equal(cut[1, :6], hidden[1, :6])
    mask = deep.mask(None)  # causal without padding had no mask; the second row is padded now
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    assert mask.shape == (2, 1, 7, 7) and mask[0, 0].equal(causal)
    assert mask[1, 0].equal(causal & (torch.arange(7) < 6))


@pytest.mark.parametrize(
    "points", [[[0.5, 0.5], [0.25, 0.25]], [[0.25, 0.25], [0.5, 0.5]], [[0.0, 0.5]], [[1.0, 0.5]], [[0.5, 0.0]]]
)
def test_deep_cuts_go_deeper_and_keep_fewer(points):
    with pytest.raises(ValidationError, match="ascending depths in \\(0, 1\\) and descending ratios"):
        VTCConfig(deep_cuts=points)


def test_deep_cuts_refuse_a_packed_batch_in_one_line(model, batch):
    sts.apply_sts(model, deep_recipe() | {"pack": True})
    sts.set_progress(model, 0, 10)
    with pytest.raises(ValueError, match="^sts: vtc.deep_cuts needs padded batches"):
        model(**batch)
