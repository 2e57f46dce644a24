"""A LLaVA record as a sample of any transformers multimodal processor: its text, tokens and labels.

The text comes from the processor's own chat template and the image tokens are expanded by
the processor itself, so the same code serves the tiny model and a
real checkpoint. Labels cover only the assistant's answers (and their end-of-turn token).

Two formats, as LLaVA-1.5 trains: `chat` (the processor's chat template; instruction tuning)
and `plain` (alignment on captions: the images, then the first answer and the end-of-sequence
token, no template and no instruction, so almost every token the language model reads is
visual).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from sts.cli.data.records import IMAGE_PLACEHOLDER, RecordError, image_paths, open_image
from sts.cut import IGNORE_INDEX


def to_messages(conversations: list[dict], images: int) -> list[dict]:
    """LLaVA turns -> chat-template messages. Each `<image>` placeholder becomes an image part of
    its turn; images no placeholder names go with the first user turn (LLaVA's convention)."""
    messages, placed = [], sum(t["value"].count(IMAGE_PLACEHOLDER) for t in conversations if t["from"] == "human")
    unplaced = max(images - placed, 0)
    for turn in conversations:
        text = turn["value"].replace(IMAGE_PLACEHOLDER, "").strip()
        if turn["from"] == "human":
            count = turn["value"].count(IMAGE_PLACEHOLDER) + (unplaced if not messages else 0)
            content = [{"type": "image"}] * count + [{"type": "text", "text": text}]
            messages.append({"role": "user", "content": content})
        elif turn["from"] == "gpt":
            messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
        else:
            raise RecordError(f"unknown speaker {turn['from']!r}; expected 'human' or 'gpt'")
    return messages


def answer_spans(processor, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The full conversation text and the character span of each assistant answer."""
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = processor.apply_chat_template(messages[:k], add_generation_prompt=True)
        upto = processor.apply_chat_template(messages[: k + 1])
        if not upto.startswith(prompt):
            raise RecordError("the chat template does not render a conversation prefix-stably")
        spans.append((len(prompt), len(upto)))
    return processor.apply_chat_template(messages), spans


def plain_spans(processor, record: dict, images: int) -> tuple[str, list[tuple[int, int]]]:
    """LLaVA's `plain` text of a record: its images' markup, then its first answer and the
    end-of-sequence token, which is the one span trained on."""
    answers = [turn["value"].strip() for turn in record["conversations"] if turn["from"] == "gpt"]
    if not answers:
        raise RecordError("no 'gpt' turn, which the plain format trains on")
    eos = processor.tokenizer.eos_token
    prefix = image_markup(processor) * images
    return prefix + answers[0] + eos, [(len(prefix), len(prefix) + len(answers[0]) + len(eos))]


def image_markup(processor) -> str:
    """What the processor's chat template writes for one image (`<image>\n` for LLaVA,
    `<|vision_start|><|image_pad|><|vision_end|>` for Qwen-VL, whose positions need the
    delimiters): the difference between a user turn with the image and one without."""

    def render(content: list[dict]) -> str:
        return processor.apply_chat_template([{"role": "user", "content": content + [{"type": "text", "text": "x"}]}])

    with_image, without = render([{"type": "image"}]), render([])
    start = len(os.path.commonprefix([with_image, without]))
    end = len(os.path.commonprefix([with_image[start:][::-1], without[start:][::-1]]))
    return with_image[start : len(with_image) - end]


def render(processor, record: dict, images: int, template: str) -> tuple[str, list[tuple[int, int]]]:
    """A record's whole text in `template` (chat or plain), and the character spans trained on."""
    if template == "plain":
        return plain_spans(processor, record, images)
    return answer_spans(processor, to_messages(record["conversations"], images))


def encode(processor, record: dict, images_dir: Path, template: str = "chat") -> dict[str, torch.Tensor]:
    """Token ids, labels, image inputs and any other per-token inputs (e.g. `mm_token_type_ids`)
    of one record in `template` (chat or plain); per-token inputs are 1-D, image inputs as the
    processor returns them."""
    paths = image_paths(record)
    text, spans = render(processor, record, len(paths), template)
    images = [open_image(images_dir, path) for path in paths]
    inputs = dict(processor(text=text, images=images or None, return_tensors="pt"))
    input_ids = inputs.pop("input_ids")[0]
    inputs.pop("attention_mask", None)
    inputs.pop("token_type_ids", None)
    tokenizer = processor.tokenizer

    expanded = expanded_positions(tokenizer(text)["input_ids"], input_ids.tolist(), visual_token_ids(processor))

    def position(chars: int) -> int:
        """Where the text's first `chars` characters end among the expanded tokens."""
        return expanded[len(tokenizer(text[:chars])["input_ids"])]

    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for start, end in spans:
        labels[position(start) : position(end)] = input_ids[position(start) : position(end)]
    per_token = {k: v[0] for k, v in inputs.items() if v.dim() == 2 and v.shape == (1, len(input_ids))}
    return {"input_ids": input_ids, "labels": labels, **inputs, **per_token}


def visual_token_ids(processor) -> set[int]:
    """The ids of the placeholder tokens the processor expands into an image's (or video's) tokens."""
    tokens = [getattr(processor, name, None) for name in ("image_token", "video_token")]
    return {processor.tokenizer.convert_tokens_to_ids(token) for token in tokens if token}


def expanded_positions(text_ids: list[int], input_ids: list[int], visual: set[int]) -> list[int]:
    """For each position of the text's own tokens (and one past the end), its position once the
    processor has expanded every image placeholder into its tokens, so that an answer after an
    image, between images or before one is labelled where it lands. Adjacent placeholders share
    their run of visual tokens evenly (images of one resolution)."""
    positions, i, j = [], 0, 0
    while j < len(text_ids):
        if text_ids[j] not in visual:
            if i >= len(input_ids) or input_ids[i] != text_ids[j]:
                raise RecordError("the processor's image tokens do not line up with the text's placeholders")
            positions.append(i)
            i, j = i + 1, j + 1
            continue
        placeholders = next((k for k in range(j, len(text_ids)) if text_ids[k] not in visual), len(text_ids)) - j
        run = next((k for k in range(i, len(input_ids)) if input_ids[k] not in visual), len(input_ids)) - i
        positions += [i + q * run // placeholders for q in range(placeholders)]
        i, j = i + run, j + placeholders
    return positions + [len(input_ids)]
