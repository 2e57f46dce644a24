"""VQA evaluation of a saved model: the full model (all tokens, all layers), greedy answers.

Every question of every record is asked with the conversation before it (earlier questions
with their reference answers), and scored by exact match.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from sts.cli.data.check import problems
from sts.cli.data.records import DataError, Records, image_paths, open_image
from sts.cli.data.render import to_messages


def questions(records: list[dict]) -> list[dict]:
    """One item per human turn: its conversation prefix, reference answer and type."""
    items = []
    for record in records:
        turns = record["conversations"]
        for k in range(0, len(turns) - 1, 2):
            items.append(
                {
                    "record": record,
                    "messages": to_messages(turns[: k + 1], len(image_paths(record))),
                    "answer": turns[k + 1]["value"].strip(),
                    "type": turns[k].get("type", "all"),
                }
            )
    return items


def normalise(answer: str) -> str:
    return answer.strip().lower().rstrip(".")


@torch.no_grad()
def answer(model, processor, items: list[dict], images_dir: Path, batch_size: int, max_new_tokens: int) -> list[str]:
    processor.tokenizer.padding_side = "left"
    predictions = []
    for start in tqdm(range(0, len(items), batch_size), desc="eval", leave=False):
        batch = items[start : start + batch_size]
        prompts = [processor.apply_chat_template(i["messages"], add_generation_prompt=True) for i in batch]
        images = [open_image(images_dir, path) for i in batch for path in image_paths(i["record"])]
        inputs = processor(text=prompts, images=images or None, padding=True, return_tensors="pt")
        inputs.pop("token_type_ids", None)
        inputs = inputs.to(model.device)
        generated = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id
        )
        new_tokens = generated[:, inputs["input_ids"].shape[1] :]
        predictions += processor.batch_decode(new_tokens, skip_special_tokens=True)
    return predictions


def evaluate(
    model_dir: str | Path,
    data: str | Path,
    images: str | Path | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 8,
    limit: int | None = None,
) -> dict:
    """Exact-match accuracy overall and per question type."""
    from sts.cli.checkpoints import load_model_and_processor

    stored = Records(data)
    count = len(stored) if limit is None else min(limit, len(stored))
    images_dir = Path(images) if images else Path(data).parent
    problem = next(problems(stored, images_dir, count), None)
    if problem is not None:
        raise DataError(problem)
    model, processor = load_model_and_processor(model_dir)
    model.eval()
    items = questions([stored[i] for i in range(count)])
    predictions = answer(model, processor, items, images_dir, batch_size, max_new_tokens)
    hits = defaultdict(list)
    for item, prediction in zip(items, predictions):
        hits[item["type"]].append(normalise(prediction) == normalise(item["answer"]))
    every = [h for values in hits.values() for h in values]
    return {
        "accuracy": sum(every) / len(every),
        "questions": len(every),
        "per_type": {kind: sum(v) / len(v) for kind, v in sorted(hits.items())},
        "model_dir": str(model_dir),
    }


def format_table(result: dict) -> str:
    lines = [f"{'question type':<16}{'accuracy':>10}"]
    lines += [f"{kind:<16}{value:>10.3f}" for kind, value in result["per_type"].items()]
    lines.append(f"{'overall':<16}{result['accuracy']:>10.3f}   ({result['questions']} questions)")
    return "\n".join(lines)


def write_json(result: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))
