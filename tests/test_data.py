import json

import torch

from sts.cli.data.collate import Collator
from sts.cli.data.dataset import LlavaDataset
from sts.cli.data.render import answer_spans, to_messages
from sts.cli.data.synth import IMAGE_SIZE
from sts.cut import IGNORE_INDEX


def test_every_word_is_in_the_vocabulary(synth_data, processor):
    unk = processor.tokenizer.unk_token_id
    for split in ("train", "test"):
        for record in json.loads(synth_data[split].read_text()):
            text, _ = answer_spans(processor, to_messages(record["conversations"], images=1))
            assert unk not in processor.tokenizer(text)["input_ids"], text


def test_labels_cover_exactly_the_answers(synth_data, processor):
    dataset = LlavaDataset(synth_data["train"], processor)
    tokenizer = processor.tokenizer
    for index in range(len(dataset)):
        sample = dataset[index]
        labelled = sample["labels"] != IGNORE_INDEX
        assert torch.equal(sample["labels"][labelled], sample["input_ids"][labelled])
        answers = [t["value"] for t in dataset.records[index]["conversations"][1::2]]
        expected = [tok for a in answers for tok in (a, tokenizer.eos_token)]
        assert tokenizer.convert_ids_to_tokens(sample["labels"][labelled].tolist()) == expected


def test_answers_before_between_and_after_images_are_labelled_where_they_land(synth_data, processor, tmp_path):
    """Images in later turns: an answer before an image is not shifted by that image's tokens."""
    records = json.loads(synth_data["train"].read_text())[:3]
    turns = [dict(turn) for turn in records[0]["conversations"][:2] + records[1]["conversations"][:2]]
    turns[0]["value"] = turns[0]["value"].replace("<image>\n", "")
    later_image = {"id": "later", "image": records[0]["image"], "conversations": [dict(t) for t in turns]}
    two_images = {
        "id": "two",
        "image": [records[0]["image"], records[1]["image"]],
        "conversations": [dict(turns[0], value="<image>\n" + turns[0]["value"]), turns[1], turns[2], turns[3]],
    }
    path = tmp_path / "later.json"
    path.write_text(json.dumps([later_image, two_images]))
    dataset = LlavaDataset(path, processor, images=synth_data["train"].parent)
    tokenizer = processor.tokenizer
    for index, record in enumerate(json.loads(path.read_text())):
        sample = dataset[index]
        labelled = sample["labels"] != IGNORE_INDEX
        answers = [t["value"] for t in record["conversations"][1::2]]
        assert tokenizer.convert_ids_to_tokens(sample["labels"][labelled].tolist()) == [
            token for answer in answers for token in (answer, tokenizer.eos_token)
        ], record["id"]


def test_image_tokens_expanded_as_the_processor_does(synth_data, processor):
    dataset = LlavaDataset(synth_data["train"], processor)
    sample = dataset[0]
    patches = (IMAGE_SIZE // processor.patch_size) ** 2
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert int((sample["input_ids"] == image_token).sum()) == patches
    text, _ = answer_spans(processor, to_messages(dataset.records[0]["conversations"], images=1))
    from sts.cli.data.records import open_image

    reference = processor(
        text=text, images=open_image(dataset.images_dir, dataset.records[0]["image"]), return_tensors="pt"
    )
    assert torch.equal(sample["input_ids"], reference["input_ids"][0])
    assert torch.equal(sample["pixel_values"], reference["pixel_values"])


def test_collator_pads_right_and_ignores_padding(synth_data, processor):
    dataset = LlavaDataset(synth_data["train"], processor)
    samples = [dataset[i] for i in range(6)]
    samples[1] = {**samples[1], "input_ids": samples[1]["input_ids"][:-4], "labels": samples[1]["labels"][:-4]}
    batch = Collator(processor.tokenizer.pad_token_id)(samples)
    assert batch["pixel_values"].shape == (6, 3, IMAGE_SIZE, IMAGE_SIZE)
    n = len(samples[1]["input_ids"])
    assert batch["attention_mask"][1, :n].all() and not batch["attention_mask"][1, n:].any()
    assert (batch["labels"][1, n:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][1, n:] == processor.tokenizer.pad_token_id).all()


def test_plain_format_is_the_images_then_the_caption_which_alone_is_trained(synth_data, processor):
    dataset = LlavaDataset(synth_data["align"], processor, template="plain")
    tokenizer = processor.tokenizer
    for index in range(len(dataset)):
        sample = dataset[index]
        caption = dataset.records[index]["conversations"][1]["value"].split()
        tokens = tokenizer.convert_ids_to_tokens(sample["input_ids"].tolist())
        patches = (IMAGE_SIZE // processor.patch_size) ** 2
        assert tokens == [tokenizer.bos_token, *[processor.image_token] * patches, *caption, tokenizer.eos_token]
        labelled = sample["labels"] != IGNORE_INDEX
        assert tokenizer.convert_ids_to_tokens(sample["labels"][labelled].tolist()) == [*caption, tokenizer.eos_token]
        assert labelled.nonzero().min() == 1 + patches, "only the caption and its end are trained"


def test_record_without_image(processor):
    from pathlib import Path

    from sts.cli.data.render import encode

    record = {
        "id": "t",
        "conversations": [{"from": "human", "value": "How many circles are there?"}, {"from": "gpt", "value": "2"}],
    }
    sample = encode(processor, record, Path("."))
    assert "pixel_values" not in sample
    assert processor.tokenizer.convert_ids_to_tokens(sample["labels"][sample["labels"] != IGNORE_INDEX].tolist()) == [
        "2",
        "</s>",
    ]


def test_records_are_found_lazily_whatever_their_strings_hold(tmp_path):
    from sts.cli.data.records import Records

    records = [
        {
            "id": "a{",
            "conversations": [
                {"from": "human", "value": 'say "}" and \\\\ then {'},
                {"from": "gpt", "value": '\\"{}\\" ünï \\'},
            ],
        },
        {"id": "b", "image": ["x.png", "y.png"], "conversations": [], "nested": {"k": [{"v": "}"}]}},
    ]
    path = tmp_path / "tricky.json"
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False))
    lazy = Records(path)
    assert [lazy[i] for i in range(len(lazy))] == records


def test_a_broken_record_is_named_by_file_and_index(tmp_path):
    import pytest

    from sts.cli.data.records import Records

    path = tmp_path / "bad.json"
    path.write_text('[{"id": "ok", "conversations": []}, {"id": "no-turns"}]')
    with pytest.raises(ValueError, match=r"bad.json, record 1 \(id no-turns\): no 'conversations' list"):
        Records(path)[1]
    (tmp_path / "open.json").write_text('[{"id": "x", "conversations": [')
    with pytest.raises(ValueError, match="open.json is not a JSON list"):
        Records(tmp_path / "open.json")


def test_indexing_memory_does_not_grow_with_the_file(tmp_path, monkeypatch):
    """Two offsets a record: 40,000 records (~9 MB of JSON) index in well under a megabyte when
    the file is read in small chunks (a chunk is the most of the file ever held)."""
    import tracemalloc

    import sts.cli.data.records as records_module

    record = {
        "id": "r",
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "a red circle " * 10},
        ],
    }
    path = tmp_path / "big.json"
    path.write_text(json.dumps([record] * 40_000))
    monkeypatch.setattr(records_module, "CHUNK", 1 << 16)
    tracemalloc.start()
    records = records_module.Records(path)
    first, last = records[0], records[len(records) - 1]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(records) == 40_000 and first == last == record
    assert peak < 1.5 * 2**20, f"indexing held {peak / 2**20:.1f} MB for a {path.stat().st_size / 2**20:.0f} MB file"


def test_max_length_cuts_text_but_never_an_image(synth_data, processor):
    import pytest

    from sts.cli.data.records import DataError

    full = LlavaDataset(synth_data["train"], processor)[0]
    patches = (IMAGE_SIZE // processor.patch_size) ** 2
    first_answer = int((full["labels"] != IGNORE_INDEX).nonzero()[0])
    cut = LlavaDataset(synth_data["train"], processor, max_length=first_answer + 1)[0]
    assert torch.equal(cut["input_ids"], full["input_ids"][: first_answer + 1])
    assert torch.equal(cut["labels"], full["labels"][: first_answer + 1])
    assert torch.equal(cut["pixel_values"], full["pixel_values"])
    with pytest.raises(DataError, match=f"record 0 .*: its images take {patches} tokens, more than max_length 5"):
        LlavaDataset(synth_data["train"], processor, max_length=5)[0]
    with pytest.raises(DataError, match=f"max_length {first_answer} leaves nothing to train on"):
        LlavaDataset(synth_data["train"], processor, max_length=first_answer)[0]


def test_samples_are_encoded_in_dataloader_workers_without_a_cache(synth_data, processor):
    from torch.utils.data import DataLoader

    dataset = LlavaDataset(synth_data["train"], processor)
    first = dataset[0]  # the parent has read too: forked workers share its file handle
    loader = DataLoader(dataset, batch_size=8, num_workers=2, collate_fn=Collator(processor.tokenizer.pad_token_id))
    batches = list(loader)
    assert sum(len(b["input_ids"]) for b in batches) == len(dataset) == 48
    assert torch.equal(batches[0]["input_ids"][0, : len(first["input_ids"])], first["input_ids"])
    ids = [dataset.records[i]["id"] for i in range(len(dataset))]
    assert ids == [r["id"] for r in json.loads(synth_data["train"].read_text())], "every record read intact"
    assert dataset.cache is None, "nothing cached"


def test_lengths_are_counted_without_encoding_and_match_the_encoding(synth_data, processor, tmp_path):
    text_only = tmp_path / "mixed.json"
    records = json.loads(synth_data["train"].read_text())[:6]
    for record in records[::2]:  # every other record without its image
        record.pop("image")
        record["conversations"][0]["value"] = record["conversations"][0]["value"].replace("<image>\n", "")
    text_only.write_text(json.dumps(records))
    for dataset in (
        LlavaDataset(synth_data["train"], processor),
        LlavaDataset(synth_data["align"], processor, template="plain"),
        LlavaDataset(text_only, processor, images=synth_data["train"].parent),
    ):
        assert dataset.lengths() == [len(dataset[i]["input_ids"]) for i in range(len(dataset))]


def test_length_grouped_batches_hold_records_of_similar_length(synth_data, processor, tmp_path):
    from transformers import TrainingArguments

    from sts.cli.models.tiny import build_model
    from sts.cli.recipe_trainer import RecipeTrainer
    from tests.conftest import TEST_SIZES

    records = json.loads(synth_data["train"].read_text())
    text_only = [
        {
            "id": f"text-{r['id']}",
            "conversations": [dict(t, value=t["value"].replace("<image>\n", "")) for t in r["conversations"]],
        }
        for r in records
    ]
    mixed = tmp_path / "mixed.json"  # 48 records with an image (~91 tokens), 48 without (~27)
    mixed.write_text(json.dumps(records + text_only))
    dataset = LlavaDataset(mixed, processor, images=synth_data["train"].parent)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, report_to="none", use_cpu=True)
    trainer = RecipeTrainer(
        model=build_model(TEST_SIZES, base=False),
        args=args,
        train_dataset=dataset,
        stage_name="test",
        group_by_length=True,
    )
    order = list(trainer._get_train_sampler())
    lengths = dataset.lengths()
    assert sorted(order) == list(range(len(dataset)))
    grouped = [[lengths[i] for i in order[b : b + 8]] for b in range(0, len(order), 8)]
    mixed_batches = sum(max(g) - min(g) > 20 for g in grouped)
    # Shuffled, nearly every batch of 8 would mix the two kinds; grouped, only those at the
    # boundary of a sorted mega-batch (3 batches each) do.
    assert mixed_batches <= len(grouped) // 3, f"batches mix images and text-only records: {grouped}"


def test_a_broken_data_file_is_one_line_from_the_cli(tmp_path, capsys):
    from sts.cli import main

    (tmp_path / "open.json").write_text('[{"id": "x", "conversations": [')
    assert (
        main(
            [
                "train",
                "demo",
                f"data.train={tmp_path / 'open.json'}",
                f"stages.0.data.train={tmp_path / 'open.json'}",
                f"output_dir={tmp_path / 'out'}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("sts: error:") and "open.json" in err and "\n" not in err
