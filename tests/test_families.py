"""Every supported model class, as a tiny random-weight model saved to and loaded from a
temporary folder: a batch with several images of different sizes and a text-only sample."""

import copy
import json
import math

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import sts
from sts.adapters import get_adapter, supported
from sts.cli import main
from sts.cli.data.collate import Collator
from sts.cli.data.render import encode
from sts.cli.models.families import save_tiny
from sts.compat import returns_tuple
from sts.cut import IGNORE_INDEX
from sts.patch import capture_features
from sts.vtc import STRATEGIES

FAMILIES = supported()
RECORDS = [
    {
        "id": "two",
        "image": ["wide.png", "tall.png"],
        "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhat color is the circle ?"},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": "How many squares are there ?"},
            {"from": "gpt", "value": "2"},
        ],
    },
    {
        "id": "text",
        "conversations": [{"from": "human", "value": "Is there a red circle ?"}, {"from": "gpt", "value": "no"}],
    },
    {
        "id": "one",
        "image": "square.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhich side is the blue square on ?"},
            {"from": "gpt", "value": "left"},
        ],
    },
]
SIZES = {"wide.png": (80, 48), "tall.png": (48, 96), "square.png": (64, 64)}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    generator = torch.Generator().manual_seed(0)
    for name, size in SIZES.items():
        pixels = torch.randint(0, 255, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / name)
    (folder / "train.json").write_text(json.dumps(RECORDS * 2))
    return folder


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory, images):
    """(model in training mode, processor, batch, checkpoint folder) of one class."""
    folder = save_tiny(request.param, tmp_path_factory.mktemp(request.param))
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(folder)
    assert type(model).__name__ == request.param
    batch = Collator(processor.tokenizer.pad_token_id)([encode(processor, r, images) for r in RECORDS])
    return model.train(), processor, batch, folder


def fresh(family):
    model, _, batch, _ = family
    return copy.deepcopy(model), batch


def language_model_inputs(model, batch, cfg=None):
    """What the language model receives for `batch` (with STS `cfg` attached, if given)."""
    seen = []
    adapter = get_adapter(model)
    handle = adapter.language_model().register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True
    )
    if cfg is not None:
        sts.apply_sts(model, cfg)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    sts.remove_sts(model)
    return seen[-1]


def visual_mask(model, batch):
    ids = torch.tensor([m.token_id for m in get_adapter(model).modalities()])
    return torch.isin(batch["input_ids"], ids)


def units_per_row(model, batch) -> list[list]:
    """The adapter's units of every image, grouped by the row its tokens are in."""
    adapter = get_adapter(model)
    with capture_features(adapter) as features, torch.no_grad():
        model(**batch)
    rows = [[] for _ in batch["input_ids"]]
    for modality in adapter.modalities():
        slots = (batch["input_ids"] == modality.token_id).nonzero()
        offset = 0
        for unit in adapter.units(modality.name, features.get(modality.name, []), batch):
            rows[int(slots[offset, 0])].append(unit)
            offset += unit.size
    return rows


def test_images_are_counted_from_the_inputs_as_the_model_splits_its_features(family):
    model, batch = fresh(family)
    adapter = get_adapter(model)
    with capture_features(adapter) as features, torch.no_grad():
        model(**batch)
    assert adapter.images_in(batch) == sum(len(f) for f in features.values()) == 3


def expected_kept(unit, strategy: str, ratio: float) -> int:
    """Tokens of a unit the language model should see: the fixed ones, plus a quarter of the
    grid (selections), or one per window of the grid (pool: 2 x 2 windows for a quarter)."""
    rows, cols = unit.grid
    fixed = unit.size - rows * cols
    if strategy == "pool":
        return fixed + math.ceil(rows / 2) * math.ceil(cols / 2)
    return fixed + max(1, round(rows * cols * ratio))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_language_model_receives_exactly_the_kept_tokens(family, strategy):
    model, batch = fresh(family)
    full = language_model_inputs(model, batch)
    cut = language_model_inputs(model, batch, {"vtc": {"strategy": strategy, "keep_ratio": 0.25}})
    units, kept = units_per_row(model, batch), cut["attention_mask"].sum(1)
    text = (batch["attention_mask"].bool() & ~visual_mask(model, batch)).sum(1)
    assert [bool(u) for u in units] == [True, False, True], "two images, none, one"
    assert (kept - text).tolist() == [sum(expected_kept(u, strategy, 0.25) for u in row) for row in units]
    assert cut["inputs_embeds"].shape[1] == int(kept.max()) < full["inputs_embeds"].shape[1]
    # Every text token is there, in order, with its embedding; the text-only sample is untouched.
    for row in range(3):
        old_text = full["inputs_embeds"][row][batch["attention_mask"][row].bool() & ~visual_mask(model, batch)[row]]
        new_rows = cut["inputs_embeds"][row][: int(kept[row])]
        matches = (new_rows[:, None] == old_text[None]).all(-1)
        assert matches.any(0).all()
    assert torch.equal(cut["inputs_embeds"][1, : int(kept[1])], full["inputs_embeds"][1, : int(kept[1])])


def positions(inputs, row):
    """[tokens, dims] position ids of one row (1-D or 3-D alike; Qwen3-VL's text row first)."""
    ids = inputs["position_ids"]
    ids = ids[:, row] if ids.dim() == 3 else ids[row][None]
    return ids.T[inputs["attention_mask"][row].bool()]


@pytest.mark.parametrize("strategy", ["uniform", "pool"])
def test_kept_tokens_keep_their_original_positions(family, strategy):
    model, batch = fresh(family)
    full = language_model_inputs(model, batch)
    if full["position_ids"] is None:  # the decoder counts positions itself
        length = batch["input_ids"].shape[1]
        full["position_ids"] = torch.arange(length).expand(len(batch["input_ids"]), -1)
    full["attention_mask"] = batch["attention_mask"]
    cut = language_model_inputs(model, batch, {"vtc": {"strategy": strategy, "keep_ratio": 0.25}})
    visual = visual_mask(model, batch)
    for row in range(3):
        old, new = positions(full, row).tolist(), positions(cut, row).tolist()
        old_text = [p for p, v in zip(old, visual[row][batch["attention_mask"][row].bool()]) if not v]
        it = iter(old)
        assert all(p in it for p in new), "the kept positions are the full sequence's, in order"
        assert [p for p in new if p in old_text] == old_text, "text keeps every position it has with all tokens"


def test_eval_mode_is_the_unpatched_model_bit_for_bit(family):
    model, batch = fresh(family)
    model.eval()
    with torch.no_grad():
        reference = model(**batch).logits
        sts.apply_sts(model, {"vtc": {"strategy": "distinct", "keep_ratio": 0.25}, "lds": {"alpha": 1.0}})
        patched = model(**batch).logits
    assert torch.equal(patched, reference)


def test_full_keep_ratio_gives_the_unpatched_loss(family):
    model, batch = fresh(family)
    reference = model(**batch).loss
    sts.apply_sts(model, {"vtc": {"strategy": "uniform", "keep_ratio": 1.0}})
    assert torch.equal(model(**batch).loss, reference)


def test_labels_stay_on_the_answers(family):
    model, batch = fresh(family)
    seen = []
    original = model.loss_function
    model.loss_function = lambda logits, labels, **kw: seen.append(labels) or original(logits, labels, **kw)
    sts.apply_sts(model, {"vtc": {"strategy": "random", "keep_ratio": 0.25}})
    model(**batch).loss.backward()
    for row in range(3):
        answers = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX]
        assert torch.equal(seen[-1][row][seen[-1][row] != IGNORE_INDEX], answers)


def test_skipping_a_layer_is_running_it_as_an_identity(family):
    model, batch = fresh(family)
    layers = get_adapter(model).num_layers
    k = 1  # Qwen3-VL's tiny model adds DeepStack features after layers 0 and 1
    reference = copy.deepcopy(model)
    layer = get_adapter(reference).decoder_layers()[k]

    def identity(module, args, kwargs, output):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        return (hidden_states,) if returns_tuple(module) else hidden_states

    layer.register_forward_hook(identity, with_kwargs=True)
    expected = reference(**batch).loss
    sts.apply_sts(model, {"lds": {"alpha": 1.0, "epsilon": 0.0, "protect_first": k, "protect_last": layers - k - 1}})
    sts.set_progress(model, 0, 10)
    loss = model(**batch).loss
    assert sts.step_stats(model)["skipped_layers"] == [k]
    assert torch.allclose(loss, expected, atol=1e-6)
    assert len(get_adapter(model).decoder_layers()) == layers


def test_a_few_sts_train_steps_run(family, images, tmp_path):
    """Both stages of the demo recipe, packed (the compressor in alignment, the skipper after)."""
    *_, folder = family
    steps = [
        f"stages.{i}.{key}={value}"
        for i in (0, 1)
        for key, value in (("max_steps", 2), ("batch_size", 3), ("logging_steps", 1), ("packing", "true"))
    ]
    assert (
        main(
            [
                "train",
                "demo",
                f"model.path={folder}",
                f"data.train={images / 'train.json'}",
                f"stages.0.data.train={images / 'train.json'}",
                f"output_dir={tmp_path}",
                *steps,
            ]
        )
        == 0
    )
    trained = AutoModelForImageTextToText.from_pretrained(tmp_path / "instruct" / "model")
    assert type(trained).__name__ == type(family[0]).__name__


@pytest.mark.parametrize(
    "recipe, name",
    [
        ("llava-1.5", "LlavaForConditionalGeneration"),
        ("llava-next", "LlavaNextForConditionalGeneration"),
        ("llava-onevision", "LlavaOnevisionForConditionalGeneration"),
        ("qwen2.5-vl", "Qwen2_5_VLForConditionalGeneration"),
    ],
)
def test_shipped_recipes_train_their_family(recipe, name, images, tmp_path):
    """Each shipped real-model recipe runs as written (gradient checkpointing included) on a
    tiny checkpoint of its family; only the paths, sizes and precision are overridden."""
    folder = save_tiny(name, tmp_path / "model")
    steps = [
        f"stages.{i}.{key}={value}"
        for i in (0, 1)
        for key, value in (("max_steps", 1), ("batch_size", 3), ("gradient_accumulation_steps", 1), ("bf16", "false"))
    ]
    data = [
        f"{prefix}.{key}={value}"
        for prefix in ("data", "stages.0.data")
        for key, value in (("train", images / "train.json"), ("images", images))
    ]
    assert main(["train", recipe, f"model.path={folder}", *data, f"output_dir={tmp_path / 'run'}", *steps]) == 0
    assert (tmp_path / "run" / "instruct" / "model" / "config.json").exists()


def test_an_unknown_model_is_a_clear_error_naming_the_supported_classes():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=10)
    )
    with pytest.raises(TypeError, match="no adapter for LlamaForCausalLM") as error:
        sts.apply_sts(model, {"vtc": {}})
    assert all(name in str(error.value) for name in FAMILIES) and "docs/adapters.md" in str(error.value)


def test_proportional_attention_weighs_pooled_tokens_on_every_family(family):
    """With eager attention the 4-D mask reaches the decoder with each pooled token weighted as its
    window: the last real query of a row weighs as many tokens as the row had before pooling."""
    model, batch = fresh(family)
    model.set_attn_implementation("eager")
    cut = language_model_inputs(
        model, batch, {"vtc": {"strategy": "pool", "keep_ratio": 0.25, "proportional_attention": True}}
    )
    mask = cut["attention_mask"]
    assert mask.dim() == 4
    for row in range(3):
        allowed = mask[row, 0] > torch.finfo(mask.dtype).min
        last = int(allowed.any(-1).nonzero().max()) if allowed.any() else 0
        weights = mask[row, 0, last][allowed[last]].exp().sum()
        assert round(float(weights)) == int(batch["attention_mask"][row].sum())


@pytest.mark.parametrize("skipper", [None, {"alpha": 1.0, "epsilon": 0.0, "protect_first": 0, "protect_last": 1}])
def test_proportional_attention_as_a_key_bias_is_the_eager_mask_on_every_family(family, skipper):
    """SDPA (no float mask: the bias rides in one more head dimension) gives the loss and gradients
    of eager attention's 4-D float mask, with and without skipped layers."""
    results = {}
    for attention in ("eager", "sdpa"):
        model, batch = fresh(family)
        model.set_attn_implementation(attention)
        vtc = {"strategy": "pool", "keep_ratio": 0.25, "proportional_attention": True}
        sts.apply_sts(model, {"vtc": vtc, "lds": skipper})
        sts.set_progress(model, 0, 10)
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results[attention] = loss, grads, sts.step_stats(model)["skipped_layers"]
    (eager_loss, eager_grads, eager_skips), (loss, grads, skips) = results["eager"], results["sdpa"]
    assert skips == eager_skips and (skipper is None) == (skips == [])
    assert torch.allclose(loss, eager_loss, atol=1e-5)
    assert grads.keys() == eager_grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, eager_grads[name], atol=1e-5), name


def test_deep_cuts_shorten_the_deep_layers_keep_the_answers_and_train_alike_on_every_kernel(family):
    """The last layer reads half of each image's pooled tokens (past Qwen3-VL's DeepStack layers):
    the labels are the answers still, and SDPA's key bias gives eager's loss and gradients."""
    cfg = {"vtc": {"strategy": "pool", "keep_ratio": 0.25, "proportional_attention": True, "deep_cuts": [[0.75, 0.5]]}}
    eager = trained_once(family, cfg, "eager")
    model, batch = fresh(family)
    seen = []
    original = model.loss_function
    model.loss_function = lambda logits, labels, **kw: seen.append(labels) or original(logits, labels, **kw)
    sts.apply_sts(model, cfg)
    sts.set_progress(model, 0, 10)
    loss = model(**batch).loss
    loss.backward()
    stats = sts.step_stats(model)
    [(layer, length)] = stats["deep_seq_lens"]
    assert layer == round(0.75 * get_adapter(model).num_layers) and length < stats["lm_seq_len"]
    for row in range(3):
        answers = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX]
        assert torch.equal(seen[-1][row][seen[-1][row] != IGNORE_INDEX], answers)
    assert_same_training(eager, (loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))


def trained_once(family, cfg: dict | None, attention: str = "sdpa", batch=None):
    """Loss and gradients of one training forward and backward with STS `cfg` attached (None: the
    plain model), on the family's batch or `batch`."""
    model, family_batch = fresh(family)
    batch = family_batch if batch is None else batch
    model.set_attn_implementation(attention)
    if cfg is None:
        loss = model(**batch).loss
        loss.backward()
        return loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    sts.apply_sts(model, cfg)
    sts.set_progress(model, 0, 10)
    loss = model(**batch).loss
    loss.backward()
    return loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same_training(first, second, tolerance=1e-5):
    (loss, grads), (other_loss, other_grads) = first, second
    assert torch.allclose(loss, other_loss, atol=tolerance)
    assert grads.keys() == other_grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, other_grads[name], atol=tolerance), name


PACKED_SETTINGS = {
    "full-tokens": {},
    "uniform": {"vtc": {"strategy": "uniform", "keep_ratio": 0.5}},
    "pool-proportional": {"vtc": {"strategy": "pool", "keep_ratio": 0.25, "proportional_attention": True}},
    "pool-proportional-skipper": {
        "vtc": {"strategy": "pool", "keep_ratio": 0.25, "proportional_attention": True},
        "lds": {"alpha": 1.0, "epsilon": 0.0, "protect_first": 0, "protect_last": 1},
    },
}


@pytest.mark.parametrize(
    "setting, attention",
    [(setting, "sdpa") for setting in PACKED_SETTINGS] + [("full-tokens", "eager"), ("pool-proportional", "eager")],
)
def test_a_packed_batch_trains_as_the_padded_batch(family, setting, attention):
    """One padding-free row of samples (3-D positions on Qwen, DeepStack rows on Qwen3-VL) gives the
    padded batch's loss and gradients."""
    cfg = PACKED_SETTINGS[setting]
    assert_same_training(trained_once(family, {**cfg, "pack": True}, attention), trained_once(family, cfg, attention))


def test_a_packed_batch_reaches_the_language_model_as_one_row_of_real_tokens(family):
    model, batch = fresh(family)
    cfg = {"vtc": {"strategy": "uniform", "keep_ratio": 0.5}}
    padded = language_model_inputs(model, batch, cfg)
    packed = language_model_inputs(model, batch, {**cfg, "pack": True})
    real = int(padded["attention_mask"].sum())
    assert padded["inputs_embeds"].shape[0] == 3 and padded["inputs_embeds"].shape[1] * 3 > real
    assert packed["inputs_embeds"].shape[:2] == (1, real)
    assert packed["attention_mask"].shape == (1, 1, real, real)
    assert packed["position_ids"].shape[-2:] == (1, real)


def flattened(batch: dict) -> dict:
    """The batch as a flattening collator (transformers' DataCollatorWithFlattening) makes it: one row
    of every sample's tokens, position ids restarting at 0, each sample's first label ignored; no KV
    cache (transformers tells packed samples apart only without one)."""
    real = batch["attention_mask"].bool()
    labels = batch["labels"].clone()
    labels[:, 0] = IGNORE_INDEX
    positions = torch.cat([torch.arange(int(n)) for n in real.sum(1)])
    rest = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels")}
    return {
        **rest,
        "input_ids": batch["input_ids"][real][None],
        "labels": labels[real][None],
        "position_ids": positions[None],
        "use_cache": False,
    }


@pytest.mark.parametrize("setting", ["uniform", "pool-proportional"])
def test_a_flattening_collators_batch_is_cut_per_sample(family, setting):
    """A batch a flattening collator packed keeps its samples apart through the cut (whose position
    gaps transformers would read as sample boundaries): the padded batch's loss and gradients."""
    model, batch = fresh(family)
    if model.config.model_type.startswith("qwen"):
        pytest.skip("Qwen's M-RoPE positions of a flattened batch are the collator's to compute")
    plain = trained_once(family, None, batch=flattened(batch))
    assert_same_training(plain, trained_once(family, None))  # the flattened batch is the same samples
    cfg = PACKED_SETTINGS[setting]
    assert_same_training(trained_once(family, cfg, batch=flattened(batch)), trained_once(family, cfg))
