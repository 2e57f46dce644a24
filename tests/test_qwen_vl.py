"""Qwen-VL specifics: videos compressed per temporal group, DeepStack features cut with the tokens."""

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from sts.adapters import get_adapter
from sts.cli.models.families import save_tiny
from sts.patch import capture_features
from tests.test_families import language_model_inputs

FRAMES, HEIGHT, WIDTH = 2, 8, 8  # video patches; 2 x 2 merged: 4 x 4 = 16 tokens per temporal group
PER_GROUP = HEIGHT * WIDTH // 4


def tiny(name, tmp_path):
    folder = save_tiny(name, tmp_path / name)
    return AutoModelForImageTextToText.from_pretrained(folder).train(), AutoProcessor.from_pretrained(folder)


def video_batch(model, tokenizer, groups_apart: bool) -> dict:
    """One video of FRAMES temporal groups and a question about it. Qwen3-VL's processor writes
    each temporal group as its own run of tokens, Qwen2-VL's one run for the whole video."""
    config = model.config
    ids = tokenizer("<|im_start|> user", add_special_tokens=False)["input_ids"]
    runs = [PER_GROUP] * FRAMES if groups_apart else [PER_GROUP * FRAMES]
    for n in runs:
        ids += [config.vision_start_token_id] + [config.video_token_id] * n + [config.vision_end_token_id]
    ids += tokenizer(
        "How many squares are there ? <|im_end|> <|im_start|> assistant 2 <|im_end|>", add_special_tokens=False
    )["input_ids"]
    ids = torch.tensor([ids])
    labels = torch.full_like(ids, -100)
    labels[0, -2:] = ids[0, -2:]
    patch = 3 * 2 * 8 * 8  # channels x temporal patch x patch x patch
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "mm_token_type_ids": (ids == config.video_token_id).long() * 2,
        "pixel_values_videos": torch.randn(FRAMES * HEIGHT * WIDTH, patch, generator=torch.Generator().manual_seed(0)),
        "video_grid_thw": torch.tensor([[FRAMES, HEIGHT, WIDTH]]),
    }


@pytest.mark.parametrize(
    "name", ["Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration"]
)
def test_video_is_compressed_per_temporal_group(name, tmp_path):
    model, processor = tiny(name, tmp_path)
    batch = video_batch(model, processor.tokenizer, groups_apart=name.startswith("Qwen3"))
    full = language_model_inputs(model, batch)
    cut = language_model_inputs(model, batch, {"vtc": {"strategy": "uniform", "keep_ratio": 0.25}})
    video = batch["input_ids"][0] == model.config.video_token_id
    assert cut["inputs_embeds"].shape[1] == batch["input_ids"].shape[1] - int(video.sum()) * 3 // 4
    # M-RoPE rows (t, h, w) of the kept video tokens: a centred 2 x 2 sub-grid of each group's 4 x 4.
    full_video = full["position_ids"][-3:, 0, video].T
    kept = [p for p in cut["position_ids"][-3:, 0].T.tolist() if p in full_video.tolist()]
    assert len(kept) == FRAMES * PER_GROUP // 4
    times = sorted({p[0] for p in full_video.tolist()})
    for time in times:
        group = [p for p in full_video.tolist() if p[0] == time]
        rows, cols = sorted({p[1] for p in group}), sorted({p[2] for p in group})
        expected = [[time, rows[r], cols[c]] for r in (1, 3) for c in (1, 3)]  # uniform's centred rows/cols
        assert [p for p in kept if p[0] == time] == expected


@pytest.mark.parametrize("name", ["Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration"])
def test_a_video_counts_as_the_model_splits_its_features(name, tmp_path):
    model, processor = tiny(name, tmp_path)
    batch = video_batch(model, processor.tokenizer, groups_apart=name.startswith("Qwen3"))
    adapter = get_adapter(model)
    with capture_features(adapter) as features, torch.no_grad():
        model.train()(**batch)
    assert adapter.images_in(batch) == len(features["video"])


def test_deepstack_features_are_cut_with_the_tokens(tmp_path):
    model, processor = tiny("Qwen3VLForConditionalGeneration", tmp_path)
    batch = video_batch(model, processor.tokenizer, groups_apart=True)
    full = language_model_inputs(model, batch)
    for strategy in ("uniform", "pool"):
        cut = language_model_inputs(model, batch, {"vtc": {"strategy": strategy, "keep_ratio": 0.25}})
        visual = cut["visual_pos_masks"][0]
        assert int(visual.sum()) == FRAMES * PER_GROUP // 4
        old_visual = full["visual_pos_masks"][0]
        old_embeds = full["inputs_embeds"][0][old_visual]
        for layer, (old, new) in enumerate(zip(full["deepstack_visual_embeds"], cut["deepstack_visual_embeds"])):
            assert new.shape == (int(visual.sum()), old.shape[1])
            for row, embed in enumerate(cut["inputs_embeds"][0][visual]):
                # The sources of a kept token: the old visual tokens whose mean it is.
                weights = torch.linalg.lstsq(old_embeds.T, embed[:, None]).solution.flatten()
                sources = weights.abs() > 1e-3
                assert torch.allclose(new[row], old[sources].mean(0), atol=1e-5), (strategy, layer, row)


def test_a_processor_that_needs_a_missing_package_is_one_line(synth_data, tmp_path, capsys):
    """A real Qwen2.5-VL checkpoint's processor loads its video processor, which needs torchvision."""
    import importlib.util
    import json

    from sts.cli import main

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed here")
    folder = save_tiny("Qwen2_5_VLForConditionalGeneration", tmp_path / "qwen")
    config = json.loads((folder / "processor_config.json").read_text())
    config["processor_class"] = "Qwen2_5_VLProcessor"  # as a real checkpoint names it
    config["video_processor"] = {"video_processor_type": "Qwen2VLVideoProcessor"}
    (folder / "processor_config.json").write_text(json.dumps(config))
    (folder / "video_preprocessor_config.json").write_text(json.dumps(config["video_processor"]))  # older releases
    data = [f"data.train={synth_data['train']}", f"stages.0.data.train={synth_data['align']}"]
    assert main(["train", "qwen2.5-vl", f"model.path={folder}", *data, f"output_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"sts: error: model.path: {folder}: its processor needs torchvision (the Qwen-VL and OneVision video "
        "processors use it), which is not installed here; install it (torchvision: the build that matches your torch)"
    )
