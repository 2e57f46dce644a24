"""apply_sts / remove_sts: attach the Sparse Training Scheme to a model, in training only.

The model's `forward` is replaced on the instance (no new parent modules, so state-dict keys
never change). In `model.eval()` the original forward runs untouched. In training the model
still runs its own forward: the compressor cuts the sequence where the language model receives
it (a pre-hook, for that one forward), and skipped layers are identities for that forward.
Everything STS needs to know about training progress comes from `set_progress`; nothing here
logs or does I/O.
"""

from __future__ import annotations

import contextlib
import functools
from collections import deque

import torch

from sts.adapters import get_adapter
from sts.adapters.base import Adapter
from sts.config import STSConfig
from sts.cut import Cut
from sts.data.llava import IGNORE_INDEX
from sts.lds import draw_skips, seed_of, seeded_coin
from sts.vtc import FEATURE_STRATEGIES, TEXT_STRATEGIES, Context, compress

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

    def visual_token_ids(self, device) -> torch.Tensor:
        return torch.tensor([m.token_id for m in self.adapter.modalities()], device=device)

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
        state.stats = {"batch_size": 0, "images": 0, "visual_tokens_in": 0, "visual_tokens_kept": 0,
                       "input_seq_len": 0, "lm_seq_len": 0}
        if input_ids is not None:
            visual = int(torch.isin(input_ids, state.visual_token_ids(input_ids.device)).sum())
            state.stats.update(batch_size=input_ids.shape[0], visual_tokens_in=visual, visual_tokens_kept=visual,
                               input_seq_len=input_ids.shape[1], lm_seq_len=input_ids.shape[1])
        compressing = state.vtc_active() and input_ids is not None and state.stats["visual_tokens_in"] > 0
        # A fused LM head (TRL's `fused_lm_head=True`) scores the labels inside the forward: they stay
        # in the call and are cut in place with the sequence. Otherwise STS computes the loss itself.
        fused = bool(kwargs.get("fused_lm_head"))
        labels = (kwargs.get("labels") if fused else kwargs.pop("labels", None)) if compressing else None
        skipped = state.draw_skips()
        with contextlib.ExitStack() as stack:
            features = stack.enter_context(capture_features(state.adapter))
            if compressing:
                cut = stack.enter_context(cutting_the_sequence(state, kwargs, labels, features, in_place=fused))
            if skipped:
                stack.enter_context(state.adapter.without_layers(skipped))
                kwargs["use_cache"] = False
            output = state.original_forward(**kwargs)
        state.micro_batch += 1
        state.stats["images"] = sum(len(f) for f in features.values())
        state.history.append(dict(state.stats))
        if compressing and labels is not None and not fused:
            output = with_loss(model, output, cut.result.pick(labels, IGNORE_INDEX), kwargs)
        return output

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


@contextlib.contextmanager
def capture_features(adapter: Adapter):
    """Record each modality's projected features, one tensor per image, as the model's own
    feature method returns them (the method is wrapped on the instance for one forward)."""
    owner = adapter.feature_owner()
    captured: dict[str, list[torch.Tensor]] = {}
    for modality in adapter.modalities():
        original = getattr(owner, modality.method)

        def recording(*args, _original=original, _name=modality.name, **kwargs):
            output = _original(*args, **kwargs)
            captured.setdefault(_name, []).extend(output.pooler_output)
            return output

        setattr(owner, modality.method, recording)
    try:
        yield captured
    finally:
        for modality in adapter.modalities():
            delattr(owner, modality.method)


class PendingCut:
    """The cut of the current forward, known once the language model has been called."""

    result: Cut | None = None


@contextlib.contextmanager
def cutting_the_sequence(state: STSState, inputs: dict, labels: torch.Tensor | None, features: dict,
                         in_place: bool = False):
    """While the model runs, cut the sequence where its language model receives it; `in_place`:
    make `labels` (the caller's tensor object) the cut labels too, for a head that reads them."""
    pending = PendingCut()

    def hook(module, args, kwargs):
        pending.result, kwargs = cut_sequence(state, inputs, labels, features, kwargs)
        if in_place and labels is not None:
            labels.set_(pending.result.pick(labels, IGNORE_INDEX))
        return args, kwargs

    handle = state.adapter.language_model().register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        yield pending
    finally:
        handle.remove()


def cut_sequence(state: STSState, inputs: dict, labels: torch.Tensor | None, features: dict,
                 lm_inputs: dict) -> tuple[Cut, dict]:
    """Keep `keep_ratio` of every image's tokens (per unit, see `Adapter.units`); cut the
    embeddings, mask, positions (1-D or 3-D) and every input that travels with the tokens alike."""
    vtc, adapter = state.cfg.vtc, state.adapter
    keep_ratio = vtc.keep_ratio_at(state.progress)
    embeds = lm_inputs["inputs_embeds"]
    device = embeds.device
    attention_mask = lm_inputs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(inputs["input_ids"])
    if attention_mask.dim() != 2:
        raise ValueError("sts: the visual token compressor needs a 2-D (padding) attention mask")
    # The cut is planned on the host: it is hundreds of tiny index operations, each of which
    # would wait for the device there; only strategies that read the features touch it.
    input_ids, padding = inputs["input_ids"].cpu(), attention_mask.bool().cpu()
    batch, length = input_ids.shape
    instructions = instruction_embeddings(state, input_ids, padding, labels, embeds) \
        if vtc.strategy in TEXT_STRATEGIES else [None] * batch

    owners = torch.where(padding, torch.arange(length), -1)
    unit_index, kept_visual = 0, 0
    for modality in adapter.modalities():
        slots = (input_ids == modality.token_id).nonzero()  # [(row, position)], row-major
        offset = 0
        for unit in adapter.units(modality.name, features.get(modality.name, []), inputs):
            row, positions = int(slots[offset, 0]), slots[offset : offset + unit.size, 1]
            offset += unit.size
            candidates = positions if unit.candidates is None else positions[unit.candidates.cpu()]
            generator = torch.Generator().manual_seed(seed_of(state.cfg.seed, state.step, state.micro_batch, unit_index))
            unit_features = embeds[row, candidates.to(device)] if vtc.strategy in FEATURE_STRATEGIES \
                else torch.empty(len(candidates), 0)  # the others look only at the grid
            groups = compress(vtc.strategy, unit_features, unit.grid, keep_ratio,
                              Context(instructions[row], generator)).cpu()
            live = groups >= 0
            firsts = torch.full((int(groups.max()) + 1,), length).scatter_reduce(0, groups[live], candidates[live], "amin")
            owners[row, candidates] = torch.where(live, firsts[groups.clamp(min=0)], -1)
            kept_visual += len(positions) - len(candidates) + len(firsts)
            unit_index += 1
        if offset != len(slots):
            raise ValueError(f"sts: the {modality.name} units cover {offset} of the batch's {len(slots)} "
                             f"{modality.name} tokens; the adapter's units() does not fit this model's inputs")

    cut = Cut.from_owners(owners).to(device)
    positions = lm_inputs.get("position_ids")
    if positions is None:
        positions = torch.arange(length, device=device).expand(batch, -1)
    if vtc.reindex_positions:
        new_positions = torch.arange(cut.length, device=device).expand(*positions.shape[:-1], -1)
        new_positions = new_positions.masked_fill(~cut.real.expand_as(new_positions), 0)
    else:
        new_positions = cut.pick(positions.expand(*positions.shape[:-2], batch, -1))
    out = {**lm_inputs, "inputs_embeds": cut.mean(embeds), "position_ids": new_positions}
    mask = cut.real.to(attention_mask.dtype)
    out["attention_mask"] = proportional_mask(mask, cut.sizes, embeds.dtype) if vtc.proportional_attention else mask
    for name, mask_name in adapter.visual_row_kwargs.items():
        rows = lm_inputs.get(name)
        if rows is not None:
            old_mask = lm_inputs[mask_name]
            out[name] = [cut.mean_visual(r, old_mask) for r in rows] if isinstance(rows, (list, tuple)) \
                else cut.mean_visual(rows, old_mask)
    for name in adapter.sequence_kwargs:
        if lm_inputs.get(name) is not None:
            out[name] = cut.pick(lm_inputs[name])
    state.stats.update(visual_tokens_kept=kept_visual, lm_seq_len=cut.length)
    return cut, out


def instruction_embeddings(state: STSState, input_ids: torch.Tensor, padding: torch.Tensor,
                           labels: torch.Tensor | None, embeds: torch.Tensor) -> list[torch.Tensor | None]:
    """Per row, the embeddings of the user's text (not visual, special or answer tokens), or None."""
    visual = torch.isin(input_ids, state.visual_token_ids(input_ids.device))
    instruction = padding & ~visual & ~state.adapter.special_token_mask(input_ids)
    if labels is not None:
        instruction &= labels.cpu() == IGNORE_INDEX
    return [embeds[b][instruction[b].to(embeds.device)] if instruction[b].any() else None
            for b in range(len(input_ids))]


def with_loss(model, output, labels: torch.Tensor, inputs: dict):
    """The model's output with the loss of the cut sequence, computed as the model computes it."""
    loss = model.loss_function(logits=output.logits, labels=labels,
                               vocab_size=model.config.get_text_config().vocab_size,
                               num_items_in_batch=inputs.get("num_items_in_batch"))
    return type(output)(loss=loss, **{k: v for k, v in output.items() if k != "loss"})


def proportional_mask(padding: torch.Tensor, sizes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A causal 4D additive mask whose key bias log(size) weighs each token as `size` tokens in
    every softmax (ToMe's proportional attention); [batch, 1, length, length]."""
    length = padding.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=padding.device).tril()
    allowed = causal[None] & padding.bool()[:, None, :]
    bias = sizes.log().to(dtype)[:, None, :].expand(-1, length, -1)
    return torch.where(allowed, bias, torch.finfo(dtype).min)[:, None]
