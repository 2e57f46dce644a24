import copy
import math

import pytest
import torch
import torch.nn.functional as F

import sts
from sts.cli.data.collate import Collator
from sts.cli.models.tiny import build_model
from sts.cut import IGNORE_INDEX, proportional_mask
from sts.patch import has_sts
from sts.vtc import Context, compress, distinct, kept_count, text_guided
from tests.conftest import TEST_SIZES

STRATEGIES = ["uniform", "random", "text_guided", "distinct", "pool"]
PATCHES = (TEST_SIZES.image_size // TEST_SIZES.patch_size) ** 2


def record_language_model_inputs(model):
    """A forward pre-hook on the language model: what it really receives."""
    seen = []
    model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True
    )
    return seen


def expected_kept(strategy: str, ratio: float) -> int:
    if strategy == "pool" and ratio < 1:
        k = max(1, round(math.sqrt(1 / ratio)))
        return math.ceil(math.isqrt(PATCHES) / k) ** 2
    return kept_count(PATCHES, ratio)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("ratio", [0.25, 0.5, 1.0])
def test_language_model_receives_exactly_the_kept_tokens(model, batch, strategy, ratio):
    seen = record_language_model_inputs(model)
    sts.apply_sts(model, sts.STSConfig(vtc={"strategy": strategy, "keep_ratio": ratio}))
    model(**batch)
    mask = seen[-1]["attention_mask"]
    text_tokens = (batch["attention_mask"].bool() & (batch["input_ids"] != model.config.image_token_id)).sum(1)
    assert mask.sum(1).tolist() == (text_tokens + expected_kept(strategy, ratio)).tolist()
    assert seen[-1]["inputs_embeds"].shape[1] == int(mask.sum(1).max())
    stats = sts.step_stats(model)
    assert stats["visual_tokens_in"] == 4 * PATCHES
    assert stats["visual_tokens_kept"] == 4 * expected_kept(strategy, ratio)


def test_kept_tokens_keep_their_positions_unless_reindexed(model, batch):
    seen = record_language_model_inputs(model)
    sts.apply_sts(model, {"vtc": {"strategy": "uniform", "keep_ratio": 0.25}})
    model(**batch)
    positions, mask = seen[-1]["position_ids"][0], seen[-1]["attention_mask"][0].bool()
    first_image = int((batch["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    kept_images = positions[mask][first_image : first_image + PATCHES // 4] - first_image
    side = math.isqrt(PATCHES)  # a 4x4 sub-grid of the 8x8 grid, centred: rows/cols 1, 3, 5, 7
    assert kept_images.tolist() == [r * side + c for r in (1, 3, 5, 7) for c in (1, 3, 5, 7)]
    assert positions[mask][-1] == int(batch["attention_mask"][0].sum()) - 1, "text keeps its original position"

    sts.apply_sts(model, {"vtc": {"strategy": "uniform", "keep_ratio": 0.25, "reindex_positions": True}})
    model(**batch)
    positions, mask = seen[-1]["position_ids"][0], seen[-1]["attention_mask"][0].bool()
    assert positions[mask].tolist() == list(range(int(mask.sum())))


def test_full_keep_ratio_gives_the_unpatched_loss(model, batch):
    reference = model(**batch).loss
    sts.apply_sts(model, {"vtc": {"strategy": "uniform", "keep_ratio": 1.0}})
    assert torch.equal(model(**batch).loss, reference)


def test_labels_stay_on_the_answers(model, batch):
    seen = []
    original = model.loss_function
    model.loss_function = lambda logits, labels, **kw: seen.append(labels) or original(logits, labels, **kw)
    sts.apply_sts(model, {"vtc": {"strategy": "random", "keep_ratio": 0.25}})
    model(**batch)
    kept_labels = seen[-1]
    for row in range(len(kept_labels)):
        original_answers = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX]
        assert torch.equal(kept_labels[row][kept_labels[row] != IGNORE_INDEX], original_answers)


def test_labels_of_the_last_positions_only_score_as_the_whole_labels_do(model, batch):
    """ms-swift passes labels for the last `logits_to_keep` positions only (its head scores no more)."""
    sts.apply_sts(model, {"vtc": {"strategy": "pool", "keep_ratio": 0.25}})
    keep = 20
    whole = batch["labels"].clone()
    whole[:, :-keep] = IGNORE_INDEX
    expected = model(**{**batch, "labels": whole}).loss
    tail = model(**{**batch, "labels": batch["labels"][:, -keep:], "logits_to_keep": keep}).loss
    assert torch.allclose(tail, expected) and torch.isfinite(expected)


def test_eval_mode_is_the_unpatched_model_bit_for_bit(model, batch):
    model.eval()
    with torch.no_grad():
        reference = model(**batch).logits
        sts.apply_sts(model, {"vtc": {"strategy": "text_guided", "keep_ratio": 0.25}})
        patched = model(**batch).logits
        sts.remove_sts(model)
        removed = model(**batch).logits
    assert torch.equal(patched, reference) and torch.equal(removed, reference)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gradients_reach_every_trainable_part(model, batch, strategy):
    model.model.vision_tower.requires_grad_(False)
    sts.apply_sts(model, {"vtc": {"strategy": strategy, "keep_ratio": 0.25}})
    model(**batch).loss.backward()
    for name, param in model.named_parameters():
        if "vision_tower" in name:
            assert param.grad is None, name
        elif "embed_tokens" not in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_random_is_reproducible_per_step_and_fresh_across_steps(model, batch):
    seen = record_language_model_inputs(model)
    sts.apply_sts(model, {"vtc": {"strategy": "random", "keep_ratio": 0.25}, "seed": 5})
    draws = []
    for step in (1, 1, 2):
        sts.set_progress(model, 0, 10)
        sts.set_progress(model, step, 10)  # a new step: the micro-batch counter starts at 0
        with torch.no_grad():
            model(**batch)
        draws.append(seen[-1]["inputs_embeds"])
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])


def test_final_fraction_trains_on_full_tokens(model, batch):
    sts.apply_sts(model, {"vtc": {"strategy": "uniform", "keep_ratio": 0.25, "full_tokens_final_fraction": 0.2}})
    sts.set_progress(model, 79, 100)
    model(**batch)
    assert sts.step_stats(model)["visual_tokens_kept"] == 4 * PATCHES // 4
    sts.set_progress(model, 80, 100)
    model(**batch)
    assert sts.step_stats(model)["visual_tokens_kept"] == 4 * PATCHES


def test_keep_ratio_schedule_goes_from_coarse_to_fine(model, batch):
    schedule = {"strategy": "pool", "keep_ratio": 1 / 16, "keep_ratio_schedule": [[0.5, 0.25], [0.9, 1.0]]}
    sts.apply_sts(model, {"vtc": schedule})
    kept = []
    for step in (0, 49, 50, 89, 90):
        sts.set_progress(model, step, 100)
        model(**batch)
        kept.append(sts.step_stats(model)["visual_tokens_kept"])
    assert kept == [4 * PATCHES // 16] * 2 + [4 * PATCHES // 4] * 2 + [4 * PATCHES]
    assert sts.STSConfig(vtc=schedule).vtc.phases() == [(0.5, 1 / 16), (0.4, 0.25), pytest.approx((0.1, 1.0))]


@pytest.mark.parametrize("points", [[[0.6, 0.25], [0.5, 0.5]], [[1.0, 0.5]], [[0.5, 0.0]]])
def test_a_keep_ratio_schedule_must_ascend_inside_the_stage(points):
    from sts.cli.recipes import ConfigError, load_recipe

    with pytest.raises(ConfigError, match="keep_ratio_schedule"):
        load_recipe("demo", [f"vtc.keep_ratio_schedule={points}"])


def full_token_steps(seed: int, steps: int = 400) -> list[bool]:
    """Which steps a random full-token fraction of 0.3 leaves uncompressed; asserts that every
    micro-batch of a step (or every rank) decides alike."""
    model = build_model(TEST_SIZES, seed=3, base=False).train()
    state = sts.apply_sts(
        model, {"vtc": {"strategy": "uniform", "full_tokens_random_fraction": 0.3}, "seed": seed}
    )._sts_state
    full = []
    for step in range(steps):
        sts.set_progress(model, step, 1000)
        decisions = {state.vtc_active() for _ in range(3)}
        assert len(decisions) == 1
        full.append(not decisions.pop())
    return full


def test_random_fraction_of_steps_on_full_tokens():
    full = full_token_steps(seed=2)
    assert 0.23 < sum(full) / len(full) < 0.37
    assert full_token_steps(seed=2) == full, "a pure function of seed and step"
    assert full_token_steps(seed=3) != full


def test_text_guided_keeps_what_the_question_names(model, batch, processor):
    """Image tokens that equal the question's word embedding are kept; those that equal the
    answer's are not (answers are what is being predicted, never a guide)."""
    row = 0
    ids, labels = batch["input_ids"][row], batch["labels"][row]
    instruction_ids = set(ids[labels == IGNORE_INDEX].tolist())
    answer_id = next(int(t) for t in labels[labels != IGNORE_INDEX] if int(t) not in instruction_ids)
    question_word = processor.tokenizer.convert_tokens_to_ids("What")
    embed = model.get_input_embeddings().weight.detach()
    quarter = PATCHES // 4
    chosen = torch.randperm(PATCHES, generator=torch.Generator().manual_seed(0))[: 2 * quarter]
    question_slots, answer_slots = chosen[:quarter].sort().values, chosen[quarter:].sort().values

    features = torch.randn(PATCHES, embed.shape[1]) * 0.01
    features[question_slots] = embed[question_word] + 0.01 * torch.randn(quarter, embed.shape[1])
    features[answer_slots] = embed[answer_id] * 3
    single = {k: v[row : row + 1] for k, v in batch.items()}
    if not (ids == question_word).any():
        pytest.skip("first record has no 'What' question")
    sts.apply_sts(model, {"vtc": {"strategy": "text_guided", "keep_ratio": 0.25}})
    model.model.multi_modal_projector.register_forward_hook(lambda module, args, out: features[None].to(out))
    seen = record_language_model_inputs(model)
    model(**single)
    first_image = int((ids == model.config.image_token_id).nonzero()[0])
    kept_positions = seen[-1]["position_ids"][0][first_image : first_image + quarter] - first_image
    assert kept_positions.tolist() == question_slots.tolist()


def test_text_guided_without_instruction_falls_back_to_uniform():
    features = torch.randn(64, 16)
    context = Context(instruction=None, generator=torch.Generator())
    groups = text_guided(features, (8, 8), 16, context)
    assert (groups >= 0).nonzero().flatten().tolist() == [r * 8 + c for r in (1, 3, 5, 7) for c in (1, 3, 5, 7)]


def test_distinct_keeps_the_objects_not_the_background():
    """A flat background with a few objects on it: the objects' tokens are the ones kept."""
    torch.manual_seed(0)
    background = torch.randn(16)
    features = background + 0.01 * torch.randn(64, 16)
    objects = torch.tensor([3, 17, 18, 40, 41, 62])
    features[objects] = torch.randn(len(objects), 16) * 3
    groups = distinct(features, (8, 8), len(objects), Context(instruction=None, generator=torch.Generator()))
    assert (groups >= 0).nonzero().flatten().tolist() == objects.tolist()
    assert groups[objects].tolist() == list(range(len(objects)))


def test_sample_without_image_is_untouched(model, processor):
    from pathlib import Path

    from sts.cli.data.render import encode

    text_only = encode(
        processor,
        {"conversations": [{"from": "human", "value": "How many circles are there?"}, {"from": "gpt", "value": "2"}]},
        Path("."),
    )
    batch = Collator(processor.tokenizer.pad_token_id)([text_only])
    seen = record_language_model_inputs(model)
    model(**batch)
    sts.apply_sts(model, {"vtc": {"strategy": "uniform", "keep_ratio": 0.25}})
    model(**batch)
    assert torch.equal(seen[-1]["inputs_embeds"], seen[-2]["inputs_embeds"])
    assert torch.equal(seen[-1]["attention_mask"], batch["attention_mask"])


def test_pooled_tokens_stand_for_their_windows():
    groups = compress("pool", torch.randn(49, 8), (7, 7), 0.25, Context(None, torch.Generator()))
    sizes = torch.bincount(groups)
    assert sizes.sum() == 49  # 2x2 windows over 7x7: the last row and column are half windows
    assert sorted(set(sizes.tolist())) == [1, 2, 4]
    assert groups.view(7, 7)[:2, :2].unique().tolist() == [0] and groups.view(7, 7)[6, 6] == 15
    groups = compress("distinct", torch.randn(49, 8), (7, 7), 0.25, Context(None, torch.Generator()))
    assert torch.bincount(groups[groups >= 0]).tolist() == [1] * 12


def test_proportional_mask_weighs_a_token_as_the_tokens_it_stands_for():
    """Attention over [a, b, b, b, c] equals attention over [a, b, c] with b counted three times."""
    torch.manual_seed(0)
    keys, values = torch.randn(3, 8), torch.randn(3, 8)  # a, b, c
    full = [0, 1, 1, 1, 2]
    query = torch.randn(5, 8)
    reference = F.scaled_dot_product_attention(query, keys[full], values[full], is_causal=True)
    mask = proportional_mask(torch.ones(1, 3), torch.tensor([[1.0, 3.0, 1.0]]), torch.float32)
    merged = F.scaled_dot_product_attention(query[[0, 3, 4]], keys, values, attn_mask=mask[0, 0])
    assert torch.allclose(merged[2], reference[4], atol=1e-6)  # the query after the image
    assert torch.allclose(merged[0], reference[0], atol=1e-6)


def test_proportional_attention_weighs_each_pooled_token_as_its_window(model, batch):
    """Eager attention takes the key bias as a 4-D float mask (every other kernel: `test_families`)."""
    model.set_attn_implementation("eager")
    seen = record_language_model_inputs(model)
    sts.apply_sts(model, {"vtc": {"strategy": "pool", "keep_ratio": 0.25, "proportional_attention": True}})
    model(**batch).loss.backward()
    mask = seen[-1]["attention_mask"]
    length = seen[-1]["inputs_embeds"].shape[1]
    assert mask.shape == (4, 1, length, length)
    last_query = mask[:, 0, -1]  # sees every real token of its row
    real = last_query > torch.finfo(mask.dtype).min
    text_tokens = (batch["attention_mask"].bool() & (batch["input_ids"] != model.config.image_token_id)).sum(1)
    assert real.sum(1).tolist() == (text_tokens + PATCHES // 4).tolist()
    # Each row's weights add up to its full-token length: every pooled token counts as four.
    assert last_query.exp().sum(1).round().tolist() == batch["attention_mask"].sum(1).tolist()
    assert torch.isclose(last_query[real].exp().max(), torch.tensor(4.0))


def test_proportional_attention_refuses_an_attention_transformers_does_not_know(model):
    model.config.get_text_config()._attn_implementation = "my_kernel"
    with pytest.raises(ValueError, match="'my_kernel' is not registered.*use sdpa, flash_attention_2"):
        sts.apply_sts(model, {"vtc": {"strategy": "pool", "proportional_attention": True}})
    assert not has_sts(model)


def test_proportional_attention_runs_in_flex_attention_as_in_eager(model, batch):
    """FlexAttention takes the key bias in one more head dimension too (its CPU kernel has no
    backward, so the loss only here; the gradients are SDPA's test on every family)."""
    losses = {}
    for attention in ("eager", "flex_attention"):
        patched = sts.apply_sts(copy.deepcopy(model), {"vtc": {"strategy": "pool", "proportional_attention": True}})
        patched.set_attn_implementation(attention)
        sts.set_progress(patched, 0, 10)
        with torch.no_grad():
            losses[attention] = patched(**batch).loss
    assert torch.allclose(losses["flex_attention"], losses["eager"], atol=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_a_cut_maps_every_old_position_as_its_groups_say(seed):
    """Cut.from_owners, batched, against the plain per-row reading of `owners`: the new tokens are
    the distinct owners in order; each old position goes to its owner's, and each new one holds
    as many old positions as name its owner."""
    from sts.cut import Cut

    generator = torch.Generator().manual_seed(seed)
    rows = []
    for length in torch.randint(1, 30, (4,), generator=generator).tolist():
        groups = torch.randint(-1, 6, (length,), generator=generator).sort().values  # runs: pooled windows
        owners = torch.arange(length)
        for group in groups.unique():
            members = (groups == group).nonzero().flatten()
            owners[members] = -1 if group < 0 else members[0]
        rows.append(torch.cat([owners, torch.full((30 - length,), -1)]))  # right padding
    cut = Cut.from_owners(torch.stack(rows))
    for b, owners in enumerate(rows):
        anchors = owners[owners >= 0].unique(sorted=True)
        assert torch.equal(cut.first[b, : len(anchors)], anchors) and not cut.real[b, len(anchors) :].any()
        expected = torch.where(owners >= 0, torch.searchsorted(anchors, owners.clamp(min=0)), -1)
        assert torch.equal(cut.target[b], expected)
        assert torch.equal(cut.sizes[b, : len(anchors)], (owners[:, None] == anchors).sum(0).float())
