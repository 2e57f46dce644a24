"""apply_sts / remove_sts: attach the Sparse Training Scheme to a model, in training only (wiring:
the per-forward state, the hooks and the stats; what is cut is `sts.cut`'s, what is skipped `sts.lds`'s).

The model's `forward` is replaced on the instance (no new parent modules, so state-dict keys
never change). In `model.eval()` the original forward runs untouched. In training the model
still runs its own forward: the compressor cuts the sequence where the language model receives
it (a pre-hook registered for as long as STS is attached, acting on the forward's pending cut;
packing, `sts.pack`, happens there too), skipped layers are identities for that forward, and
with deep cuts the layers from the first cut on read fewer visual tokens (`sts.deep`). With
self-distillation, a full-token step first runs the compressed forward without gradient, and its
answer-token predictions join the loss (DualSpeed's fast mode teaching its slow mode).
Under `torch.compile` STS's own Python runs eagerly and only the model's forward is traced.
Everything STS needs to know about training progress comes from `set_progress`; nothing here
logs or does I/O.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections import deque

import torch

from sts.adapters import get_adapter
from sts.adapters.base import Adapter
from sts.attention import install as install_key_bias
from sts.attention import key_bias as proportional_key_bias
from sts.config import STSConfig
from sts.cut import IGNORE_INDEX, Cut, cut_batch
from sts.deep import DeepCut, cut_layers, cutting_layers
from sts.draws import seeded_coin
from sts.lds import draw_skips
from sts.pack import Packing, is_flattened, pack, sample_ids

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
        self.window = Window()  # what the forwards since the last logged line did
        self.pending: PendingCut | None = None  # the cut of the forward running now, if it compresses
        self.hook = self.adapter.language_model().register_forward_pre_hook(
            cut_at_language_model(self), with_kwargs=True, prepend=True
        )

    @property
    def progress(self) -> float:
        return self.step / self.total if self.total else 0.0

    def layers_to_skip(self) -> list[int]:
        """The layers LDS draws for this forward; recorded with the running skip rate."""
        lds = self.cfg.lds
        layers = self.adapter.num_layers
        skipped = (
            [] if lds is None else draw_skips(layers, self.progress, self.step, self.micro_batch, lds, self.cfg.seed)
        )
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


class Window:
    """Sums over the training forwards of a logging window (its micro-batches and steps)."""

    COUNTS = ("samples", "images", "visual_tokens_in", "visual_tokens_kept")
    MEANS = ("input_seq_len", "lm_seq_len", "skipped_layers")  # per forward

    def __init__(self):
        self.forwards = 0
        self.sums = dict.fromkeys(self.COUNTS + self.MEANS, 0)

    def add(self, stats: dict) -> None:
        self.forwards += 1
        values = {**stats, "samples": stats["batch_size"], "skipped_layers": len(stats["skipped_layers"])}
        for key in self.sums:
            self.sums[key] += values[key]

    def summary(self) -> dict:
        means = {key: self.sums[key] / max(self.forwards, 1) for key in self.MEANS}
        return {"forwards": self.forwards, **{key: self.sums[key] for key in self.COUNTS}, **means}


def base_model(model):
    """The transformers model itself, under a wrapper that calls it (peft's PeftModel)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def apply_sts(model, cfg: STSConfig | dict):
    """Patch `model` in place for sparse training and return it; a peft model gets STS on the
    transformers model it wraps (a skipped layer skips its adapters too)."""
    wrapper, model = model, base_model(model)
    cfg = cfg if isinstance(cfg, STSConfig) else STSConfig(**cfg)
    attention = model.config.get_text_config()._attn_implementation
    if cfg.vtc and cfg.vtc.proportional_attention and attention != "eager":
        install_key_bias(attention)  # the key bias rides in the kernel's head dimension (`sts.attention`)
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
        teacher = teacher_forward(state, kwargs)
        plan = begin_forward(state, kwargs)
        try:
            output = state.original_forward(**kwargs)
        finally:
            plan.close()
        return end_forward(model, state, plan, kwargs, output, teacher)

    model.forward = torch.compiler.disable(forward, recursive=False)
    return wrapper


class ForwardPlan:
    """What STS does around one training forward: its contexts (features captured, the pending cut
    the language model's pre-hook reads, skipped layers), entered before the model's forward and
    closed after it."""

    def __init__(self):
        self.contexts = contextlib.ExitStack()
        self.fused = False
        self.labels: torch.Tensor | None = None
        self.cut: PendingCut | None = None

    @torch.compiler.disable
    def close(self) -> None:
        self.contexts.close()


@torch.compiler.disable
def begin_forward(state: STSState, kwargs: dict, teacher: bool = False) -> ForwardPlan:
    """Record the batch, draw this forward's skips, decide whether it is compressed (or packed) and
    enter the plan's contexts; `kwargs` (the model's inputs) is edited in place. A `teacher` forward
    (self-distillation's) is compressed and skips no layer."""
    plan = ForwardPlan()
    input_ids = kwargs.get("input_ids")
    state.stats = {
        "batch_size": 0,
        "images": state.adapter.images_in(kwargs),
        "tower_images": state.adapter.tower_images_in(kwargs),
        "visual_tokens_in": 0,
        "visual_tokens_kept": 0,
        "input_seq_len": 0,
        "lm_seq_len": 0,
        "deep_seq_lens": [],  # (layer, length) of each deep cut: the sequence from that layer on
        "skipped_layers": [],
        "teacher": None,  # a self-distillation step's teacher forward: its stats, as a forward's
    }
    if input_ids is not None:
        visual = int(state.adapter.visual_token_mask(input_ids).sum())
        state.stats.update(
            batch_size=input_ids.shape[0],
            visual_tokens_in=visual,
            visual_tokens_kept=visual,
            input_seq_len=input_ids.shape[1],
            lm_seq_len=input_ids.shape[1],
        )
    compressing = (teacher or state.vtc_active()) and input_ids is not None and state.stats["visual_tokens_in"] > 0
    # A fused LM head (TRL's `fused_lm_head=True`) scores the labels inside the forward: they stay
    # in the call and are cut in place with the sequence. Otherwise STS computes the loss itself.
    plan.fused = bool(kwargs.get("fused_lm_head"))
    if compressing or state.cfg.pack:
        plan.labels = kwargs.get("labels") if plan.fused else whole_sequence_labels(kwargs)
        features = plan.contexts.enter_context(capture_features(state.adapter)) if compressing else None
        state.pending = plan.cut = PendingCut(state, kwargs, plan.labels, features, plan.fused, state.cfg.pack)
        plan.contexts.callback(setattr, state, "pending", None)
    skipped = [] if teacher else state.layers_to_skip()
    if skipped:
        plan.contexts.enter_context(state.adapter.without_layers(skipped))
        kwargs["use_cache"] = False
    if compressing and state.cfg.vtc.deep_cuts:  # wraps the layers as they are now, skipped ones too
        first = min(layer for layer, _ in cut_layers(state.cfg.vtc.deep_cuts, state.adapter.num_layers))
        plan.contexts.enter_context(cutting_layers(state.adapter.decoder_layers(), first, lambda: plan.cut.deep))
    return plan


def whole_sequence_labels(kwargs: dict) -> torch.Tensor | None:
    """The labels, taken out of the model's inputs, over the whole sequence. ms-swift passes labels
    of only the last `logits_to_keep` positions (to save the head's work): they are aligned with the
    whole sequence, and the cut sequence is then scored whole."""
    labels, input_ids = kwargs.pop("labels", None), kwargs.get("input_ids")
    if labels is None or input_ids is None or not kwargs.get("logits_to_keep"):
        return labels
    missing = input_ids.shape[-1] - labels.shape[-1]
    if missing <= 0:
        return labels
    kwargs.pop("logits_to_keep")
    return torch.nn.functional.pad(labels, (missing, 0), value=IGNORE_INDEX)


class Teacher:
    """A self-distillation step's teacher: the compressed forward's answer-token logits, and its stats."""

    def __init__(self, logits: torch.Tensor, stats: dict):
        self.logits, self.stats = logits, stats


@torch.compiler.disable
def teacher_forward(state: STSState, kwargs: dict) -> Teacher | None:
    """On a full-token step with `vtc.self_distillation`, run the compressed forward without gradient
    (DualSpeed's fast mode, teacher of its slow mode); None on every other forward."""
    vtc, input_ids = state.cfg.vtc, kwargs.get("input_ids")
    if (
        vtc is None
        or not vtc.self_distillation
        or state.vtc_active()
        or kwargs.get("labels") is None
        or input_ids is None
        or not state.adapter.visual_token_mask(input_ids).any()
    ):
        return None
    if kwargs.get("fused_lm_head"):
        raise ValueError(
            "sts: vtc.self_distillation needs the model's logits, and a fused LM head (TRL's fused_lm_head) "
            "computes the loss without them; turn one of the two off"
        )
    inputs = dict(kwargs)
    inputs["labels"] = whole_sequence_labels(inputs)
    inputs.pop("logits_to_keep", None)  # the teacher scores every answer token, whatever the student keeps
    with torch.no_grad():
        plan = begin_forward(state, inputs, teacher=True)
        try:
            output = state.original_forward(**inputs)
        finally:
            plan.close()
    check_cut_ran(plan)
    stats = {**state.stats, "deep_seq_lens": plan.cut.deep.lengths if plan.cut.deep is not None else []}
    return Teacher(answer_logits(output.logits, plan.cut.cut_labels(plan.labels)), stats)


def answer_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The logits that predict the answer tokens (a causal model's next-token shift), one row each."""
    return logits[..., :-1, :][labels[..., 1:] != IGNORE_INDEX]


def check_cut_ran(plan: ForwardPlan) -> None:
    if plan.cut is not None and not plan.cut.ran:
        raise RuntimeError(
            "sts: the language model ran without STS's cut: was the model compiled before sts.apply_sts? "
            "Attach STS first (torch.compile never sees hooks added later), or compile its layers instead"
        )


@torch.compiler.disable
def end_forward(model, state: STSState, plan: ForwardPlan, kwargs: dict, output, teacher: Teacher | None = None):
    """Count the forward in the stats and give the output the cut sequence's loss (and, under a
    teacher, the distillation term)."""
    state.micro_batch += 1
    cfg = state.cfg
    if state.micro_batch == 2 and state.total == 0 and (cfg.vtc or cfg.lds):
        warnings.warn(
            "sts: training runs without progress (no sts.STSCallback in the Trainer, no sts.set_progress in "
            "the loop): the skipper stays at its peak rate and the compressor's schedules never move",
            stacklevel=3,
        )
    if plan.cut is not None and plan.cut.deep is not None:
        state.stats["deep_seq_lens"] = plan.cut.deep.lengths
    state.stats["teacher"] = None if teacher is None else teacher.stats
    state.history.append(dict(state.stats))
    state.window.add(state.stats)
    check_cut_ran(plan)
    labels = kwargs.get("labels")
    if plan.cut is not None and plan.labels is not None and not plan.fused:
        labels = plan.cut.cut_labels(plan.labels)
        output = with_loss(output, model_loss(model, output.logits, labels, kwargs))
    if teacher is not None:
        term = distillation(teacher, answer_logits(output.logits, labels), kwargs.get("num_items_in_batch"))
        output = with_loss(output, output.loss + state.cfg.vtc.self_distillation * term)
    return output


def remove_sts(model):
    """Undo apply_sts: the model is the untouched model again."""
    wrapper, model = model, base_model(model)
    state = getattr(model, STATE, None)
    if state is not None:
        del model.forward
        state.hook.remove()
        delattr(model, STATE)
    return wrapper


def has_sts(model) -> bool:
    return hasattr(base_model(model), STATE)


def state_of(model) -> STSState:
    state = getattr(base_model(model), STATE, None)
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


def window_stats(model) -> dict:
    """Sums and per-forward means over the training forwards since the last call (a log line's
    window), and the running skip rate."""
    state = state_of(model)
    summary, state.window = state.window.summary(), Window()
    return {**summary, "skip_rate": state.stats.get("skip_rate", 0.0)}


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
    """What a forward does to the language model's sequence (the cut, packing or both), what that
    needs, and, once the language model was called, what was done."""

    def __init__(self, state: STSState, inputs: dict, labels, features: dict | None, in_place: bool, pack: bool):
        self.inputs, self.labels, self.features, self.in_place, self.pack = inputs, labels, features, in_place, pack
        self.compressing = features is not None
        self.keep_ratio = state.cfg.vtc.keep_ratio_at(state.progress) if self.compressing else 1.0
        self.draw = (state.cfg.seed, state.step, state.micro_batch)
        self.ran = False
        self.result: Cut | None = None
        self.packing: Packing | None = None
        self.deep: DeepCut | None = None

    def cut_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The labels of the sequence the language model read: cut, then packed, as the tokens were."""
        if self.result is not None:
            labels = self.result.pick(labels, IGNORE_INDEX)
        labels = labels if self.packing is None else self.packing.labels(labels, IGNORE_INDEX)
        return labels if self.deep is None else self.deep.pick(labels, IGNORE_INDEX)


def cut_at_language_model(state: STSState):
    """The language model's pre-hook while STS is attached: in a compressed or packed forward, reshape
    the sequence where the language model receives it. One hook for the model's life, never one per
    forward: `torch.compile` does not guard on a module's hooks, so a compiled forward keeps calling it."""

    def hook(module, args, kwargs):
        if state.pending is None:  # traced under torch.compile: a guard, no graph break
            return None
        return cut_pending(state, args, kwargs)

    return hook


@torch.compiler.disable  # under torch.compile(model): the cut runs eagerly, one graph break
def cut_pending(state: STSState, args: tuple, kwargs: dict):
    """Cut and/or pack the pending forward's sequence; `in_place`: the caller's labels tensor becomes
    the language model's labels too, for a head that reads them."""
    pending, adapter = state.pending, state.adapter
    embeds, mask = kwargs["inputs_embeds"], kwargs.get("attention_mask")
    batch, length = embeds.shape[:2]
    # Which sample each position is: needed to pack, or to keep a flattened batch's samples apart.
    samples = sample_ids(kwargs, mask, batch, length) if pending.pack or (mask is None and batch == 1) else None
    key_bias = None
    if pending.compressing:
        vtc = state.cfg.vtc
        pending.result, kwargs, kept_visual = cut_batch(
            vtc, adapter, pending.keep_ratio, pending.draw, pending.inputs, pending.labels, pending.features, kwargs
        )
        samples = None if samples is None else pending.result.pick(samples, -1)
        state.stats.update(visual_tokens_kept=kept_visual, lm_seq_len=pending.result.length)
        if vtc.proportional_attention and adapter.attention() == "eager":
            key_bias = proportional_key_bias(pending.result.sizes)
    if samples is not None and (pending.pack or is_flattened(samples)):
        if pending.compressing and state.cfg.vtc.deep_cuts:
            raise ValueError("sts: vtc.deep_cuts needs padded batches; it cannot cut packed or flattened ones yet")
        kwargs, pending.packing = pack(kwargs, samples, adapter.attention(), adapter.sequence_kwargs, key_bias)
    if pending.compressing and state.cfg.vtc.deep_cuts:
        pending.deep = deep_cut(state, pending, kwargs)
    pending.ran = True
    if pending.in_place and pending.labels is not None:
        pending.labels.set_(pending.cut_labels(pending.labels))
    return args, kwargs


def deep_cut(state: STSState, pending: PendingCut, lm_inputs: dict) -> DeepCut:
    """This forward's deep cuts, over the sequence the language model receives (`sts.deep`)."""
    vtc, adapter, cut = state.cfg.vtc, state.adapter, pending.result
    points = cut_layers(vtc.deep_cuts, adapter.num_layers)
    for name in adapter.visual_row_kwargs:  # DeepStack adds features to the first layers' visual tokens
        rows = lm_inputs.get(name)
        if isinstance(rows, (list, tuple)) and min(layer for layer, _ in points) < len(rows):
            raise ValueError(
                f"sts: vtc.deep_cuts: the first cut must come after the {len(rows)} layers that take DeepStack "
                f"features; put it deeper than {len(rows) / adapter.num_layers:.2f}"
            )
    visual = cut.pick(adapter.visual_token_mask(pending.inputs["input_ids"]).to(cut.first.device), False)
    labels = None if pending.labels is None else cut.pick(pending.labels, IGNORE_INDEX)
    return DeepCut(
        points,
        vtc.deep_strategy,
        visual,
        cut.real,
        labels,
        adapter.attention(),
        pending.labels if pending.in_place else None,
    )


def model_loss(model, logits: torch.Tensor, labels: torch.Tensor, inputs: dict) -> torch.Tensor:
    """The loss of the cut sequence, computed as the model computes it."""
    return model.loss_function(
        logits=logits,
        labels=labels,
        vocab_size=model.config.get_text_config().vocab_size,
        num_items_in_batch=inputs.get("num_items_in_batch"),
    )


def distillation(teacher: Teacher, student: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    """KL(teacher || student) over the answer tokens' logits, summed and divided as the loss divides
    its sum (by `num_items_in_batch` under gradient accumulation, else by the answer tokens)."""
    if student.shape[0] != teacher.logits.shape[0]:
        raise RuntimeError(
            f"sts: self-distillation: the full-token forward scored {student.shape[0]} answer tokens, "
            f"the compressed one {teacher.logits.shape[0]}"
        )
    divergence = torch.nn.functional.kl_div(
        torch.log_softmax(student.float(), dim=-1),
        torch.log_softmax(teacher.logits.float(), dim=-1),
        reduction="sum",
        log_target=True,
    )
    return divergence / (num_items_in_batch if num_items_in_batch is not None else max(student.shape[0], 1))


def with_loss(output, loss: torch.Tensor):
    """The model's output with `loss` as its loss."""
    return type(output)(loss=loss, **{k: v for k, v in output.items() if k != "loss"})
