"""`sts pretrain-base`: the embedded model's pre-trained vision tower and language model.

Real MLLM training starts from a pre-trained CLIP and a pre-trained LLM; this builds the
tiny stand-ins, reproducibly, from the synthetic generator:

1. **Vision tower** - dense per-patch supervision: every patch predicts what lies in its grid
   cell (colour and shape, or empty) and where it is (row, column), so its features carry
   what a projector needs, as CLIP's do.
2. **Language model** - trained on *symbolic* scenes: where the image tokens will later be,
   it reads one embedding per patch (its cell's content, and its side where the patch can
   know it), answers the questions (chat format) and describes the scene (LLaVA's plain
   caption format, every other batch). It learns to count, compare, name and describe from a
   scene description, as an LLM learns from text; it has never seen a visual feature. The
   scene embeddings are thrown away.

Only these two parts are saved (`sts/assets/tiny-base.safetensors`); the projector of every
model built from them starts random, so the demo must still teach the model to see.

`--family llava-next` continues that language model on the anyres form's sequences (a base view,
then 2 x 2 tiles at twice the resolution, each row ended by a newline token: 336 image tokens where
the LLaVA form has 64), and writes the anyres form's own base (`tiny-base-llava-next.safetensors`)
with the same vision tower: a real LLM brings counting and comparing over any layout, which the tiny
one learnt on one layout only.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from sts.cli.data.collate import Collator
from sts.cli.data.dataset import LlavaDataset
from sts.cli.data.synth import COLOURS, GRID, SHAPES, answer_words, generate, side_of
from sts.cli.models.tiny import (
    ANYRES_TILES,
    BASE_WEIGHTS,
    EXTRA_PREFIX,
    TinyModelConfig,
    build_model,
    build_processor,
    load_base_weights,
    load_extra,
    save_base_weights,
)
from sts.cut import IGNORE_INDEX

NUM_CONTENTS = 1 + len(COLOURS) * len(SHAPES)  # empty, or one colour-shape pair
EMPTY_KEY = f"{EXTRA_PREFIX}empty"  # the learned "empty cell" vector, kept for --resume and checks
NEWLINE_KEY = f"{EXTRA_PREFIX}newline"  # the anyres form's learned row-end token, likewise
HELD_OUT_SCENES = 64  # fresh scenes (three questions of each type) scored after training


def family_of(model) -> str:
    return "llava-next" if model.config.model_type == "llava_next" else "llava"


def view_points(cfg: TinyModelConfig, family: str) -> tuple[torch.Tensor, int]:
    """(views, patches, 2): each patch's centre (row, col) in the whole image's pixels, the views in
    the processor's order (the LLaVA form's one; the anyres form's base view, then its tiles in raster
    order); and the whole image's size."""
    side = cfg.image_size // cfg.patch_size
    centre = torch.arange(side) * cfg.patch_size + cfg.patch_size // 2
    rows, cols = torch.meshgrid(centre, centre, indexing="ij")
    view = torch.stack([rows, cols], -1).reshape(-1, 2)
    if family == "llava":
        return view[None], cfg.image_size
    tiles = [view + torch.tensor([r, c]) * cfg.image_size for r in range(ANYRES_TILES) for c in range(ANYRES_TILES)]
    return torch.stack([view * ANYRES_TILES, *tiles]), ANYRES_TILES * cfg.image_size


def cells_at(points: torch.Tensor, image_size: int) -> list[tuple[int, int] | None]:
    """The grid cell under each point; None for a point off the image (a newline's)."""
    cell = image_size // GRID
    return [None if y < 0 else (int(y) // cell, int(x) // cell) for y, x in points.tolist()]


def image_token_cells(model, cfg: TinyModelConfig) -> list[tuple[int, int] | None]:
    """The grid cell each of an image's tokens shows, in the model's order; None for the anyres
    form's newline tokens. The anyres order is read off the model's own packing of patch centres
    (base view, then the tiles' rows, each ended by a newline), so it is transformers' layout."""
    family = family_of(model)
    points, image_size = view_points(cfg, family)
    if family == "llava":
        return cells_at(points[0], image_size)
    (packed,), _ = model.model.pack_image_features(
        [points.float()], torch.tensor([[image_size, image_size]]), "default", image_newline=torch.tensor([-1.0, -1.0])
    )
    return cells_at(packed, image_size)


def patch_objects(scenes: list[list[dict]], cells: list[tuple[int, int] | None]) -> list[list[dict | None]]:
    """Per image, per token: the object in the token's grid cell, or None (an empty cell or a newline)."""
    return [[next((o for o in scene if (o["row"], o["col"]) == cell), None) for cell in cells] for scene in scenes]


def patch_targets(scenes: list[list[dict]], cfg: TinyModelConfig, family: str = "llava") -> torch.Tensor:
    """(batch, views x patches) content index of each patch's grid cell: 0 empty, else colour-shape."""
    colours, shapes = list(COLOURS), list(SHAPES)
    points, image_size = view_points(cfg, family)
    return torch.tensor(
        [
            [0 if o is None else 1 + colours.index(o["colour"]) * len(SHAPES) + shapes.index(o["shape"]) for o in image]
            for image in patch_objects(scenes, cells_at(points.flatten(0, 1), image_size))
        ]
    )


class SceneBatches:
    """Collated batches that also carry each record's scene, forever, in a seeded order."""

    def __init__(self, dataset: LlavaDataset, batch_size: int, seed: int):
        if len(dataset) < batch_size:  # full batches only: fewer records would yield nothing, forever
            raise ValueError(f"{len(dataset)} records cannot fill one batch of {batch_size}")
        self.dataset = dataset
        self.collate = Collator(dataset.processor.tokenizer.pad_token_id)
        self.loader = DataLoader(
            range(len(dataset)),
            batch_size=batch_size,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(seed),
        )

    def __iter__(self):
        while True:  # forever
            for indices in self.loader:
                batch = self.collate([self.dataset[i] for i in indices.tolist()])
                batch["scenes"] = [self.dataset.records[i]["scene"] for i in indices.tolist()]
                yield batch


def alternate(*streams):
    """One batch of each stream in turn, forever."""
    for batches in zip(*streams):
        yield from batches


def train_loop(name: str, params, loss_fn, batches, steps: int, lr: float, log_every: int = 100, checkpoint=None):
    """AdamW with warm-up and cosine decay. `loss_fn` returns (loss, accuracy, extra metrics
    for the log line); `checkpoint()` runs at every log line."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    bar = tqdm(range(steps), desc=f"pretrain {name}")
    stream = iter(batches)
    for step in bar:
        loss, accuracy, metrics = loss_fn(next(stream))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{accuracy:.3f}")
        if (step + 1) % log_every == 0:
            details = "".join(f" {key} {value:.3f}" for key, value in metrics.items())
            tqdm.write(f"{name} step {step + 1}: loss {loss.item():.4f} accuracy {accuracy:.3f}{details}")
            if checkpoint:
                checkpoint()
    return accuracy


def pretrain_vision(model, cfg: TinyModelConfig, batches, steps: int, lr: float) -> float:
    """Every patch of every view learns what lies in its grid cell and where in its view it is."""
    tower, family = model.model.vision_tower, family_of(model)
    side = cfg.image_size // cfg.patch_size
    heads = nn.ModuleDict(
        {
            "content": nn.Linear(cfg.vision_hidden, NUM_CONTENTS),
            "row": nn.Linear(cfg.vision_hidden, side),
            "col": nn.Linear(cfg.vision_hidden, side),
        }
    )
    positions = torch.arange(side * side)

    def loss_fn(batch):
        pixels = batch["pixel_values"]  # the anyres form's: (images, views, channels, height, width)
        features = tower(pixels.flatten(0, 1) if pixels.dim() == 5 else pixels).last_hidden_state[:, 1:]  # drop CLS
        content = patch_targets(batch["scenes"], cfg, family).view(len(features), -1)
        logits = heads["content"](features)
        loss = F.cross_entropy(logits.flatten(0, 1), content.flatten())
        for axis, target in (("row", positions // side), ("col", positions % side)):
            axis_logits = heads[axis](features)
            loss = loss + F.cross_entropy(axis_logits.flatten(0, 1), target.repeat(len(features)))
        hits = (logits.argmax(-1) == content).float().view(len(pixels), -1, side * side)
        if hits.shape[1] == 1:
            return loss, hits.mean().item(), {}
        return loss, hits.mean().item(), {"base view": hits[:, 0].mean().item(), "tiles": hits[:, 1:].mean().item()}

    params = list(tower.parameters()) + list(heads.parameters())
    return train_loop("vision", params, loss_fn, batches, steps, lr)


class SymbolicAnswers:
    """The language model answering from a symbolic scene: each image token's cell written with the
    LM's own word embeddings (colour + shape, and side where the token can know it), or a learned
    `empty` vector; the anyres form's newline tokens a learned `newline` vector.

    A token says its object's side only in the base view (the LLaVA form's one view): the tower sees
    each anyres tile alone, so no tile token's feature can carry it, and an LM taught to read it there
    answers position at chance from projected tiles. It must read it from the base view or the layout."""

    def __init__(
        self, model, cfg: TinyModelConfig, tokenizer, empty: nn.Parameter, newline: nn.Parameter | None = None
    ):
        self.model, self.cfg, self.tokenizer, self.empty, self.newline = model, cfg, tokenizer, empty, newline
        self.cells = image_token_cells(model, cfg)
        self.newlines = torch.tensor([cell is None for cell in self.cells]).unsqueeze(-1)
        base_view = view_points(cfg, family_of(model))[0].shape[1]  # the first tokens: the base view's patches
        self.word_counts = [3 if index < base_view else 2 for index in range(len(self.cells))]
        if self.newlines.any() and newline is None:
            raise ValueError("the anyres form's newline tokens need a `newline` vector")
        self.embed_tokens = model.get_input_embeddings()
        self.answer_type = {
            tokenizer.convert_tokens_to_ids(word): kind for kind, words in answer_words().items() for word in words
        }

    def describe(self, scenes) -> torch.Tensor:
        words = [
            [
                [] if o is None else [o["colour"], o["shape"], side_of(o["col"])][:count]
                for o, count in zip(image, self.word_counts)
            ]
            for image in patch_objects(scenes, self.cells)
        ]
        ids = torch.tensor(
            [[self.tokenizer.convert_tokens_to_ids(w) + [-1] * (3 - len(w)) for w in image] for image in words]
        )
        present = (ids >= 0).unsqueeze(-1)
        described = (self.embed_tokens(ids.clamp(min=0)) * present).sum(2)
        described = torch.where(present.any(2), described, self.empty)
        return described if self.newline is None else torch.where(self.newlines, self.newline, described)

    def __call__(self, batch) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(loss, hit per answer token, question type per answer token)."""
        ids = batch["input_ids"]
        image_slots = (ids == self.model.config.image_token_index).unsqueeze(-1)
        embeds = self.embed_tokens(ids).masked_scatter(image_slots, self.describe(batch["scenes"]))
        out = self.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"])
        labels = batch["labels"][:, 1:]
        answered = (labels != IGNORE_INDEX) & (labels != self.tokenizer.eos_token_id)
        hits = out.logits[:, :-1].argmax(-1)[answered] == labels[answered]
        return out.loss, hits, [self.answer_type[label] for label in labels[answered].tolist()]


def accuracy_by_type(hits: torch.Tensor, kinds: list[str]) -> dict[str, float]:
    return {kind: hits[[k == kind for k in kinds]].float().mean().item() for kind in answer_words() if kind in kinds}


def pretrain_language(scorer: SymbolicAnswers, batches, steps: int, lr: float, checkpoint=None) -> float:
    def loss_fn(batch):
        loss, hits, kinds = scorer(batch)
        return loss, hits.float().mean().item(), accuracy_by_type(hits, kinds)

    model = scorer.model
    params = list({id(p): p for p in [*model.model.language_model.parameters(), *model.lm_head.parameters()]}.values())
    params += [p for p in (scorer.empty, scorer.newline) if p is not None]  # (a tied head: each parameter once)
    return train_loop("language", params, loss_fn, batches, steps, lr, checkpoint=checkpoint)


@torch.no_grad()
def held_out_accuracy(scorer: SymbolicAnswers, batch) -> dict[str, float]:
    """Answer accuracy on scenes never trained on, overall and per question type."""
    scorer.model.eval()
    _, hits, kinds = scorer(batch)
    return {"overall": hits.float().mean().item(), **accuracy_by_type(hits, kinds)}


def pretrain_base(
    out: str | Path = "runs/pretrain-base",
    records: int = 12000,
    vision_steps: int = 150,
    language_steps: int = 4500,
    batch_size: int = 32,
    seed: int = 1234,
    family: str = "llava",
    resume: bool = False,
) -> dict:
    """Pre-train the tiny vision tower and language model; write `family`'s shipped base weights
    (every 100 language steps too). The anyres form ("llava-next") continues the LLaVA form's tower
    and language model on its own views and layout. `resume` continues the language model from the
    family's own weights."""
    out = Path(out)
    started = time.time()
    cfg = TinyModelConfig()
    weights = BASE_WEIGHTS[family]
    start = weights if resume else None if family == "llava" else BASE_WEIGHTS["llava"]
    image_size = view_points(cfg, family)[1]
    # Three questions of each type per scene: more answers per (costly) scene, faster learning.
    paths = generate(
        out / "data", train=records, test=HELD_OUT_SCENES, seed=seed, questions=15, align=records, image_size=image_size
    )
    processor = build_processor(cfg, family)
    dataset = LlavaDataset(paths["train"], processor, cache=True)
    captions = LlavaDataset(paths["align"], processor, template="plain", cache=True)
    held_out = next(iter(SceneBatches(LlavaDataset(paths["test"], processor), HELD_OUT_SCENES, seed)))
    model = build_model(cfg, seed=seed, base=False, family=family).train()
    if start:
        load_base_weights(model, cfg, start)
    empty = nn.Parameter(load_extra(start, EMPTY_KEY) if start else torch.randn(cfg.text_hidden) * 0.02)
    newline = None
    if family != "llava":
        newline = nn.Parameter(load_extra(start, NEWLINE_KEY) if resume else torch.randn(cfg.text_hidden) * 0.02)
    vision_accuracy = None
    if not resume:
        vision_accuracy = pretrain_vision(model, cfg, SceneBatches(dataset, 2 * batch_size, seed), vision_steps, 3e-3)

    def checkpoint():
        extra = {EMPTY_KEY: empty} | ({} if newline is None else {NEWLINE_KEY: newline})
        save_base_weights(model, cfg, weights, extra=extra)

    scorer = SymbolicAnswers(model, cfg, processor.tokenizer, empty, newline)
    batches = alternate(SceneBatches(dataset, batch_size, seed + resume), SceneBatches(captions, batch_size, seed))
    language_accuracy = pretrain_language(scorer, batches, language_steps, 1e-3, checkpoint)
    checkpoint()
    summary = {
        "family": family,
        "vision_patch_accuracy": vision_accuracy,
        "language_answer_accuracy": language_accuracy,
        "held_out_symbolic_accuracy": held_out_accuracy(scorer, held_out),
        "seconds": round(time.time() - started, 1),
        "weights": str(weights),
    }
    print(summary)
    return summary
