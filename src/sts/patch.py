"""apply_sts / remove_sts: attach the Sparse Training Scheme to a model, in training only.

The model's `forward` is replaced on the instance (no new parent modules, so state-dict keys
never change). In `model.eval()` the original forward runs untouched. Everything STS needs
to know about training progress comes from `set_progress`; nothing here logs or does I/O.
"""

from __future__ import annotations

import functools
from collections import deque

import torch

from sts.adapters import get_adapter
from sts.config import STSConfig
from sts.data.llava import IGNORE_INDEX
from sts.lds import draw_skips, seed_of, seeded_coin
from sts.vtc import Context, compress

STATE = "_sts_state"
FULL_TOKENS_DRAW = -1  # the seed part that gives the per-step full-token coin a stream of its own


class STSState:
    def __init__(self, model, cfg: STSConfig):
        self.cfg = cfg
        self.adapter = get_adapter(model)
        self.original_forward = model.forward
        self.step, self.total = 0, 0
        self.micro_batch = 0  # training forwards since the optimizer step last changed
        self.stats: dict = {}
        self.layer_draws, self.layers_skipped = 0, 0  # for the running skip rate
        # Stats of every training forward since the last drain; bounded, for loops that never drain.
        self.history: deque[dict] = deque(maxlen=4096)

    @property
    def progress(self) -> float:
        return self.step / self.total if self.total else 0.0

    def draw_skips(self) -> list[int]:
        """Skip the layers LDS draws for this step; record them and the running skip rate."""
        lds = self.cfg.lds
        layers = self.adapter.num_layers
        skipped = [] if lds is None else draw_skips(layers, self.progress, self.step, self.micro_batch,
                                                    lds, self.cfg.seed)
        self.layer_draws += layers
        self.layers_skipped += len(skipped)
        self.stats["skipped_layers"] = skipped
        self.stats["skip_rate"] = self.layers_skipped / self.layer_draws
        return skipped

    def vtc_active(self) -> bool:
        """Compress this step? Not in the full-token tail, nor on a drawn full-token step (the draw
        is a pure function of seed and step, so every rank and micro-batch of a step agrees)."""
        vtc = self.cfg.vtc
        if vtc is None or self.progress >= 1.0 - vtc.full_tokens_final_fraction:
            return False
        return seeded_coin(self.cfg.seed, self.step, FULL_TOKENS_DRAW) >= vtc.full_tokens_random_fraction


def apply_sts(model, cfg: STSConfig | dict):
    """Patch `model` in place for sparse training and return it."""
    cfg = cfg if isinstance(cfg, STSConfig) else STSConfig(**cfg)
    attention = model.config.get_text_config()._attn_implementation
    if cfg.vtc and cfg.vtc.proportional_attention and attention not in ("eager", "sdpa"):
        raise ValueError(f"vtc.proportional_attention needs eager or sdpa attention (a float mask), not {attention!r}")
    if hasattr(model, STATE):
        remove_sts(model)
    state = STSState(model, cfg)
    setattr(model, STATE, state)

    @functools.wraps(state.original_forward)
    def forward(*args, **kwargs):
        if not model.training:
            return state.original_forward(*args, **kwargs)
        if args:
            raise TypeError("sts: pass the model's inputs as keyword arguments (input_ids=..., pixel_values=...)")
        input_ids = kwargs.get("input_ids")
        if input_ids is not None:
            visual = int((input_ids == state.adapter.image_token_id).sum())
            pixels = kwargs.get("pixel_values")
            state.stats = {"batch_size": input_ids.shape[0], "images": 0 if pixels is None else len(pixels),
                           "visual_tokens_in": visual, "visual_tokens_kept": visual,
                           "input_seq_len": input_ids.shape[1], "lm_seq_len": input_ids.shape[1]}
        if state.vtc_active() and kwargs.get("pixel_values") is not None:
            kwargs = compress_visual_tokens(state, kwargs)
        skipped = state.draw_skips()
        state.micro_batch += 1
        state.history.append(dict(state.stats))
        if not skipped:
            return state.original_forward(**kwargs)
        with state.adapter.without_layers(skipped):
            return state.original_forward(**{**kwargs, "use_cache": False})

    model.forward = forward
    return model


def remove_sts(model):
    """Undo apply_sts: the model is the untouched model again."""
    state = getattr(model, STATE, None)
    if state is not None:
        del model.forward
        delattr(model, STATE)
    return model


def state_of(model) -> STSState:
    state = getattr(model, STATE, None)
    if state is None:
        raise ValueError("this model has no STS attached; call sts.apply_sts(model, config) first")
    return state


def set_progress(model, step: int, total: int) -> None:
    """Where training stands (optimizer steps); the STS callback calls this every step."""
    state = state_of(model)
    if step != state.step:
        state.micro_batch = 0
    state.step, state.total = step, total


def step_stats(model) -> dict:
    """What the last training forward did."""
    return dict(state_of(model).stats)


def drain_stats(model) -> list[dict]:
    """The stats of every training forward since the last call (for exact FLOPs accounting)."""
    state = state_of(model)
    history = list(state.history)
    state.history.clear()
    return history


def compress_visual_tokens(state: STSState, inputs: dict) -> dict:
    """Keep `keep_ratio` of each image's tokens; cut embeddings, labels, mask and positions alike."""
    vtc = state.cfg.vtc
    adapter = state.adapter
    input_ids = inputs.pop("input_ids")
    batch, length = input_ids.shape
    attention_mask = inputs.pop("attention_mask", None)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    labels = inputs.pop("labels", None)
    positions = inputs.pop("position_ids", None)
    if positions is None:
        positions = torch.arange(length, device=input_ids.device).expand(batch, length)

    embeds = adapter.embed_text(input_ids)
    images = adapter.image_features(inputs)  # list of (features [n, d], grid)
    image_mask = input_ids == adapter.image_token_id
    instruction_mask = attention_mask.bool() & ~image_mask & ~adapter.special_token_mask(input_ids)
    if labels is not None:
        instruction_mask &= labels == IGNORE_INDEX

    rows, image_index = [], 0
    kept_total = 0
    for b in range(batch):
        slots = image_mask[b].nonzero().flatten()
        row_embeds = embeds[b]
        row_sizes = torch.ones(length, device=input_ids.device)
        keep = attention_mask[b].bool() & ~image_mask[b]
        context = Context(instruction=embeds[b][instruction_mask[b]] if instruction_mask[b].any() else None,
                          generator=None)
        offset = 0
        while offset < len(slots):
            features, grid = images[image_index]
            context.generator = torch.Generator().manual_seed(
                seed_of(state.cfg.seed, state.step, state.micro_batch, image_index))
            kept, sources, sizes = compress(vtc.strategy, features, grid, vtc.keep_ratio, context)
            targets = slots[offset : offset + len(features)][sources.to(slots.device)]
            row_embeds = row_embeds.index_put((targets,), kept.to(row_embeds.dtype))
            keep = keep.index_fill(0, targets, True)
            row_sizes = row_sizes.index_put((targets,), sizes.to(row_sizes))
            offset += len(features)
            image_index += 1
            kept_total += len(kept)
        rows.append((row_embeds, keep, row_sizes))

    new_length = max(int(keep.sum()) for _, keep, _ in rows)
    out_embeds = embeds.new_zeros(batch, new_length, embeds.shape[-1])
    out_mask = torch.zeros(batch, new_length, dtype=attention_mask.dtype, device=input_ids.device)
    out_positions = torch.zeros(batch, new_length, dtype=positions.dtype, device=input_ids.device)
    out_sizes = torch.ones(batch, new_length, device=input_ids.device)
    out_labels = None if labels is None else torch.full_like(out_mask, IGNORE_INDEX, dtype=labels.dtype)
    for b, (row_embeds, keep, row_sizes) in enumerate(rows):
        index = keep.nonzero().flatten()
        n = len(index)
        out_embeds[b, :n] = row_embeds[index]
        out_sizes[b, :n] = row_sizes[index]
        out_mask[b, :n] = 1
        if vtc.reindex_positions:
            out_positions[b, :n] = torch.arange(n, device=positions.device)
        else:
            out_positions[b, :n] = positions[b, index]
        if labels is not None:
            out_labels[b, :n] = labels[b, index]

    state.stats.update({
        "visual_tokens_in": int(image_mask.sum()),
        "visual_tokens_kept": kept_total,
        "input_seq_len": length,
        "lm_seq_len": new_length,
    })
    for key in adapter.image_input_keys:
        inputs.pop(key, None)
    if vtc.proportional_attention:
        out_mask = proportional_mask(out_mask, out_sizes, out_embeds.dtype)
    return {**inputs, "inputs_embeds": out_embeds, "attention_mask": out_mask,
            "position_ids": out_positions, "labels": out_labels}


def proportional_mask(padding: torch.Tensor, sizes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A causal 4D additive mask whose key bias log(size) weighs each token as `size` tokens in
    every softmax (ToMe's proportional attention); [batch, 1, length, length]."""
    length = padding.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=padding.device).tril()
    allowed = causal[None] & padding.bool()[:, None, :]
    bias = sizes.log().to(dtype)[:, None, :].expand(-1, length, -1)
    return torch.where(allowed, bias, torch.finfo(dtype).min)[:, None]
