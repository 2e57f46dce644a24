import json

import torch

from sts.data.llava import IGNORE_INDEX, Collator, LlavaDataset, answer_spans, to_messages
from sts.data.synth import IMAGE_SIZE


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


def test_image_tokens_expanded_as_the_processor_does(synth_data, processor):
    dataset = LlavaDataset(synth_data["train"], processor)
    sample = dataset[0]
    patches = (IMAGE_SIZE // processor.patch_size) ** 2
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert int((sample["input_ids"] == image_token).sum()) == patches
    text, _ = answer_spans(processor, to_messages(dataset.records[0]["conversations"], images=1))
    from sts.data.llava import open_image

    reference = processor(text=text, images=open_image(dataset.images_dir, dataset.records[0]["image"]),
                          return_tensors="pt")
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

    from sts.data.llava import encode

    record = {"id": "t", "conversations": [{"from": "human", "value": "How many circles are there?"},
                                           {"from": "gpt", "value": "2"}]}
    sample = encode(processor, record, Path("."))
    assert "pixel_values" not in sample
    assert processor.tokenizer.convert_ids_to_tokens(sample["labels"][sample["labels"] != IGNORE_INDEX].tolist()) == ["2", "</s>"]
