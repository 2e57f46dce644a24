"""In-decoder progressive compression: from chosen depths of the decoder on, the language model
reads fewer of the visual tokens it received (PyramidDrop's idea; in training only).

The compressor (`sts.cut`) decides what the language model receives. A deep cut `[depth,
keep_ratio]` (`vtc.deep_cuts`) then drops visual tokens inside it: from the layer at `depth` of
the decoder on, every image keeps `keep_ratio` of the tokens it had when the language model
received it. The first layers still read every token, so what the image shows reaches the text
before most of it is dropped, and the deep layers, most of the work, run on the shorter sequence.
Only visual tokens are dropped, never text, so every label keeps its place in the loss.

For one forward, the decoder's layers from the first cut on are wrapped (`CutLayer`, as the
skipper swaps in `SkippedLayer`): a cut layer gathers the hidden states it receives, and every
wrapped layer gets what the model hands each layer gathered alike: the attention mask, the
rotary position embeddings, the position ids and proportional attention's key bias. Each tensor
is gathered once per cut, not once per layer. The labels are gathered alike for the loss
(`DeepCut.pick`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sts.adapters.base import StandIn, standing_in
from sts.attention import KEY_BIAS, allowed_keys
from sts.vtc import evenly_spaced

VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens_q", "cu_seqlens_k")


def cut_layers(points: list[tuple[float, float]], num_layers: int) -> list[tuple[int, float]]:
    """[depth, keep_ratio] points -> (layer index, keep ratio): the layer at that share of the
    decoder's depth, never the first (it must read every token) nor past the last."""
    return [(min(max(1, round(depth * num_layers)), num_layers - 1), ratio) for depth, ratio in points]


def image_runs(visual: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each run of consecutive visual positions in one row: one image each."""
    edges = torch.diff(F.pad(visual.long(), (1, 1)))
    return list(zip((edges == 1).nonzero().flatten().tolist(), (edges == -1).nonzero().flatten().tolist()))


def last_prompt_positions(labels: torch.Tensor | None, real: torch.Tensor) -> torch.Tensor:
    """[B]: per row, the position whose output predicts the first answer token (the last token of
    the prompt), or the last real token where the row has no answer."""
    last_real = real.long().cumsum(1).argmax(1)
    if labels is None:
        return last_real
    answered = labels != -100
    first_answer = answered.long().argmax(1)
    return torch.where(answered.any(1), (first_answer - 1).clamp(min=0), last_real)


class DeepCut:
    """One forward's deep cuts: which positions of the sequence the language model received are
    still read at each layer, and what travels with them, gathered."""

    def __init__(
        self,
        points: list[tuple[int, float]],
        strategy: str,
        visual: torch.Tensor,
        real: torch.Tensor,
        labels: torch.Tensor | None,
        attention: str,
        labels_in_place: torch.Tensor | None = None,
    ):
        """visual, real: [B, L] over the sequence the language model received; labels: its labels;
        labels_in_place: a tensor a fused head reads the labels from, cut in place with the sequence."""
        self.ratios = dict(points)
        self.strategy = strategy
        self.visual, self.attention = visual.cpu(), attention
        self.labels, self.labels_in_place = labels, labels_in_place
        self.query = last_prompt_positions(None if labels is None else labels.cpu(), real.cpu())
        self.keep = torch.where(real.cpu(), torch.arange(real.shape[1]), -1)  # [B, L_k]: received position, -1 pad
        self.lengths: list[tuple[int, int]] = []  # (layer, sequence length from it on), for the FLOPs
        self.gathered: dict[int, object] = {}

    @property
    def real(self) -> torch.Tensor:
        return self.keep >= 0

    @torch.compiler.disable  # host-side planning: under torch.compile it runs eagerly
    def cut(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Drop this layer's share of every image's tokens from `hidden` [B, L_k, D]."""
        rows = []
        for b in range(len(self.keep)):
            kept = self.keep[b][self.keep[b] >= 0]
            drop = torch.zeros(len(kept), dtype=torch.bool)
            for start, end in image_runs(self.visual[b]):
                members = ((kept >= start) & (kept < end)).nonzero().flatten()
                count = min(len(members), max(1, round((end - start) * self.ratios[layer])))
                chosen = members[self.chosen(hidden[b], members, kept, b, count).sort().values]
                drop[members] = True
                drop[chosen] = False
            rows.append((~drop).nonzero().flatten())
        length = max(len(r) for r in rows)
        relative = torch.stack([F.pad(r, (0, length - len(r)), value=-1) for r in rows])
        self.keep = torch.where(relative >= 0, self.keep.gather(1, relative.clamp(min=0)), -1)
        self.lengths.append((layer, length))
        self.device, self.dtype = hidden.device, hidden.dtype  # of a mask the cut must build
        self.gathered.clear()
        if self.labels_in_place is not None:
            self.labels_in_place.set_(self.pick(self.labels, -100))
        index = relative.clamp(min=0).to(hidden.device)
        return hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))

    def chosen(self, hidden: torch.Tensor, members: torch.Tensor, kept: torch.Tensor, row: int, count: int):
        """`count` indices into one image's `members`: evenly spaced (`uniform`), or the most similar
        to the last prompt token's hidden state at this layer (`text_guided`: cosine similarity; as
        PyramidDrop ranks by the last instruction token's attention)."""
        if self.strategy == "uniform":
            return evenly_spaced(count, len(members))
        query = hidden[(kept == self.query[row]).nonzero().flatten()[0]]
        scores = F.cosine_similarity(hidden[members.to(hidden.device)], query[None], dim=-1)
        return scores.topk(count).indices.cpu()

    def pick(self, x: torch.Tensor, fill=0) -> torch.Tensor:
        """x [..., B, L] over the received sequence -> [..., B, L_k] now read (`fill` on padding)."""
        index = self.keep.clamp(min=0).to(x.device)
        picked = x.gather(-1, index.expand(*x.shape[:-2], -1, -1))
        return picked.masked_fill(~self.real.to(x.device).expand_as(picked), fill)

    @torch.compiler.disable
    def layer_inputs(self, kwargs: dict) -> dict:
        """A layer's keyword inputs with everything indexed by position gathered to the kept ones."""
        if any(kwargs.get(name) is not None for name in VARLEN_KWARGS):
            raise ValueError("sts: vtc.deep_cuts needs a padded batch; packed (varlen) batches are not supported")
        out = dict(kwargs)
        if "attention_mask" in kwargs:
            out["attention_mask"] = self.once(kwargs["attention_mask"], self.mask)
        if kwargs.get("position_embeddings") is not None:
            out["position_embeddings"] = tuple(self.once(t, self.rows) for t in kwargs["position_embeddings"])
        for name in ("position_ids", KEY_BIAS):
            if kwargs.get(name) is not None:
                out[name] = self.once(kwargs[name], self.pick)
        return out

    def once(self, tensor, gather):
        """`gather(tensor)`, computed for the first layer that hands this tensor in after a cut."""
        key = id(tensor)
        if key not in self.gathered:
            self.gathered[key] = (tensor, gather(tensor))  # the tensor is held, so its id stays its own
        return self.gathered[key][1]

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., B (or 1), L, D] (rotary cos / sin) -> [..., B, L_k, D]."""
        x = x.expand(*x.shape[:-3], len(self.keep), *x.shape[-2:])
        index = self.keep.clamp(min=0).to(x.device)[..., None].expand(*x.shape[:-3], -1, -1, x.shape[-1])
        return x.gather(-2, index)

    def mask(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The layers' attention mask over the kept positions: a 2-D padding mask or a 4-D mask
        (boolean or additive) gathered on both axes; none (causal, no padding) stays none unless the
        cut leaves padding, which then gets the mask the attention implementation takes."""
        real = self.real.to(mask.device if mask is not None else self.device)
        if mask is None:
            if bool(real.all()):
                return None
            if self.attention.startswith("flash"):
                return real.long()
            allowed = allowed_keys(real)
            if self.attention == "eager":
                return torch.zeros(allowed.shape, dtype=self.dtype, device=real.device).masked_fill(
                    ~allowed, torch.finfo(self.dtype).min
                )
            return allowed
        if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 4):
            raise ValueError(f"sts: vtc.deep_cuts cannot cut this attention mask ({type(mask).__name__})")
        if mask.dim() == 2:
            return self.pick(mask, 0)
        index = self.keep.clamp(min=0).to(mask.device)
        mask = mask.expand(len(self.keep), *mask.shape[1:])
        rows = mask.gather(2, index[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3]))
        both = rows.gather(3, index[:, None, None, :].expand(-1, mask.shape[1], index.shape[1], -1))
        hidden_keys = ~real[:, None, None, :]
        fill = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
        return both.masked_fill(hidden_keys, fill)


class CutLayer(StandIn):
    """Stands in for one decoder layer in a forward with deep cuts: cuts the hidden states at a cut
    layer, hands the layer its inputs gathered to the kept positions, and returns what it returns."""

    def __init__(self, replaced: nn.Module, index: int, deep):
        super().__init__(replaced)
        self.index, self.deep = index, deep

    def forward(self, hidden_states, *args, **kwargs):
        deep = self.deep()
        if deep is None:
            return self.replaced(hidden_states, *args, **kwargs)
        if self.index in deep.ratios:
            hidden_states = deep.cut(self.index, hidden_states)
        return self.replaced(hidden_states, *args, **deep.layer_inputs(kwargs))


def cutting_layers(layers: nn.ModuleList, first: int, deep):
    """Wrap `layers[first:]` in `CutLayer`s for one forward; `deep()` returns that forward's
    `DeepCut` (None: the layers run as they are)."""
    return standing_in(layers, range(first, len(layers)), lambda index, layer: CutLayer(layer, index, deep))
