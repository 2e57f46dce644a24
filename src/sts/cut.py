"""The cut of a batch: everything the compressor does to the sequence the language model reads.

`cut_batch` plans it on the host (which visual tokens each image keeps, pooled or selected by
its strategy), and applies it to the embeddings, the mask, proportional attention's key bias,
the 1-D or 3-D positions and every input that travels with the tokens. It is a function of plain
values: the compressor's config, the adapter, the keep ratio, the seed parts of the draws and
the inputs; STS's wiring (`sts.patch`) calls it from a pre-hook on the language model.

How [B, L] becomes a shorter [B, L']: every old position either goes to one new position or is
dropped. A new position holds one old token (a selection) or several (a pooled window): float
tensors take the mean of what it holds, integer ones (ids, labels, 1-D or 3-D positions, masks)
the values of its first old token. One `Cut` is applied alike to everything indexed by sequence position, and to tensors
indexed by visual token (e.g. DeepStack features), so nothing can fall out of step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sts.adapters.base import Adapter
from sts.attention import KEY_BIAS, allowed_keys, key_bias
from sts.attention import install as install_key_bias
from sts.config import VTCConfig
from sts.draws import seeded_generator
from sts.vtc import FEATURE_STRATEGIES, TEXT_STRATEGIES, Context, compress

IGNORE_INDEX = -100  # the label the loss leaves out (transformers' convention)


@dataclass
class Cut:
    target: torch.Tensor  # [B, L]: the new position of each old one, -1 if dropped
    first: torch.Tensor  # [B, L']: the first old position each new one holds (0 on padding)
    sizes: torch.Tensor  # [B, L']: how many old positions each new one holds (0 on padding)

    @classmethod
    def from_owners(cls, owners: torch.Tensor) -> Cut:
        """owners [B, L]: for each old position, the first old position of the new token it goes
        into (itself for a token kept alone), or -1 if dropped."""
        batch, _ = owners.shape
        kept = [row[row >= 0].unique(sorted=True) for row in owners]
        length = max(1, max(len(k) for k in kept))
        target = torch.full_like(owners, -1)
        first = torch.zeros(batch, length, dtype=torch.long, device=owners.device)
        sizes = torch.zeros(batch, length, device=owners.device)
        for b, anchors in enumerate(kept):
            live = owners[b] >= 0
            target[b, live] = torch.searchsorted(anchors, owners[b, live])
            first[b, : len(anchors)] = anchors
            sizes[b] = torch.bincount(target[b, live], minlength=length).float()
        return cls(target, first, sizes)

    def to(self, device) -> Cut:
        return Cut(self.target.to(device), self.first.to(device), self.sizes.to(device))

    @property
    def length(self) -> int:
        return self.first.shape[1]

    @property
    def real(self) -> torch.Tensor:
        """[B, L'] True where a new position holds a token (False on the padding at the right)."""
        return self.sizes > 0

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, ...] float -> [B, L', ...]: each new position the mean of what it holds."""
        batch = x.shape[0]
        live = self.target >= 0
        rows = torch.arange(batch, device=x.device)[:, None].expand_as(self.target)
        index = (rows * self.length + self.target)[live]
        out = means(x[live], index, self.sizes.flatten().clamp(min=1))
        return out.reshape(batch, self.length, *x.shape[2:])

    def pick(self, x: torch.Tensor, fill=0) -> torch.Tensor:
        """x [..., B, L] (any leading dims, e.g. 3-D positions) -> [..., B, L']: the values of
        each new position's first old token; `fill` on padding."""
        index = self.first.expand(*x.shape[:-2], -1, -1)
        picked = x.gather(-1, index)
        return picked.masked_fill(~self.real.expand_as(picked), fill)

    def mean_visual(self, rows: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """rows [N, ...]: one per visual position of the old batch (visual [B, L] True, row-major)
        -> one per visual position of the new batch, pooled like the tokens themselves."""
        new_visual = self.pick(visual, False)
        new_index = torch.full(new_visual.shape, -1, dtype=torch.long, device=rows.device)
        new_index[new_visual] = torch.arange(int(new_visual.sum()), device=rows.device)
        targets = self.target[visual]
        b = visual.nonzero()[:, 0]
        live = targets >= 0
        return means(rows[live], new_index[b[live], targets[live]], self.sizes[new_visual])


def means(values: torch.Tensor, index: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """values [n, ...] summed into len(counts) slots by `index`, each divided by its count."""
    out = values.new_zeros(len(counts), *values.shape[1:]).index_add(0, index, values)
    return out / counts.to(values.dtype).reshape(-1, *[1] * (values.dim() - 1))


def cut_batch(
    vtc: VTCConfig,
    adapter: Adapter,
    keep_ratio: float,
    draw: tuple[int, ...],
    inputs: dict,
    labels: torch.Tensor | None,
    features: dict,
    lm_inputs: dict,
) -> tuple[Cut, dict, int]:
    """Keep `keep_ratio` of every image's tokens (per unit, see `Adapter.units`; anyres tiles keep
    `vtc.tile_keep_ratio` where it is set); cut the
    embeddings, mask, positions (1-D or 3-D) and every input that travels with the tokens alike.

    inputs: the model's own inputs (`input_ids`, and what `Adapter.units` reads); labels: the
    uncut labels, or None; features: each modality's projected features, one tensor per image;
    lm_inputs: what the language model receives. `draw`: the seed parts (seed, step, micro-batch)
    of this forward, to which each unit's draw adds its index. Returns the cut, the cut
    `lm_inputs` and how many visual tokens the language model reads.
    """
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
    instructions = (
        instruction_embeddings(adapter, input_ids, padding, labels, embeds)
        if vtc.strategy in TEXT_STRATEGIES
        else [None] * batch
    )

    owners = torch.where(padding, torch.arange(length), -1)
    unit_index, kept_visual = 0, 0
    for modality in adapter.modalities():
        slots = (input_ids == modality.token_id).nonzero()  # [(row, position)], row-major
        offset = 0
        for unit in adapter.units(modality.name, features.get(modality.name, []), inputs):
            row, positions = int(slots[offset, 0]), slots[offset : offset + unit.size, 1]
            offset += unit.size
            candidates = positions if unit.candidates is None else positions[unit.candidates.cpu()]
            unit_features = (
                embeds[row, candidates.to(device)]
                if vtc.strategy in FEATURE_STRATEGIES
                else torch.empty(len(candidates), 0)
            )  # the others look only at the grid
            groups = compress(
                vtc.strategy,
                unit_features,
                unit.grid,
                vtc.tile_keep_ratio if unit.tiles and vtc.tile_keep_ratio is not None else keep_ratio,
                Context(instructions[row], seeded_generator(*draw, unit_index)),
            ).cpu()
            live = groups >= 0
            firsts = torch.full((int(groups.max()) + 1,), length).scatter_reduce(
                0, groups[live], candidates[live], "amin"
            )
            owners[row, candidates] = torch.where(live, firsts[groups.clamp(min=0)], -1)
            kept_visual += len(positions) - len(candidates) + len(firsts)
            unit_index += 1
        if len(slots) and not features.get(modality.name):
            raise ValueError(
                f"sts: the batch holds {len(slots)} {modality.name} tokens but the model computed no "
                f"{modality.name} features: pass the {modality.name}s' pixel inputs (e.g. pixel_values) with them"
            )
        if offset != len(slots):
            raise ValueError(
                f"sts: the {modality.name} units cover {offset} of the batch's {len(slots)} "
                f"{modality.name} tokens; the adapter's units() does not fit this model's inputs"
            )

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
    out["attention_mask"] = cut.real.to(attention_mask.dtype)
    if vtc.proportional_attention and adapter.attention() == "eager":  # eager takes the bias as a float mask
        out["attention_mask"] = proportional_mask(out["attention_mask"], cut.sizes, embeds.dtype)
    elif vtc.proportional_attention:  # any other kernel, as one more head dimension (`sts.attention`)
        install_key_bias(adapter.attention())  # the kernel may have changed since apply_sts
        out[KEY_BIAS] = key_bias(cut.sizes)
    for name, mask_name in adapter.visual_row_kwargs.items():
        rows = lm_inputs.get(name)
        if rows is not None:
            old_mask = lm_inputs[mask_name]
            out[name] = (
                [cut.mean_visual(r, old_mask) for r in rows]
                if isinstance(rows, (list, tuple))
                else cut.mean_visual(rows, old_mask)
            )
    for name in adapter.sequence_kwargs:
        if lm_inputs.get(name) is not None:
            out[name] = cut.pick(lm_inputs[name])
    return cut, out, kept_visual


def instruction_embeddings(
    adapter: Adapter, input_ids: torch.Tensor, padding: torch.Tensor, labels: torch.Tensor | None, embeds: torch.Tensor
) -> list[torch.Tensor | None]:
    """Per row, the embeddings of the user's text (not visual, special or answer tokens), or None."""
    instruction = padding & ~adapter.visual_token_mask(input_ids) & ~adapter.special_token_mask(input_ids)
    if labels is not None:
        instruction &= labels.cpu() == IGNORE_INDEX
    return [
        embeds[b][instruction[b].to(embeds.device)] if instruction[b].any() else None for b in range(len(input_ids))
    ]


def proportional_mask(padding: torch.Tensor, sizes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A causal 4D additive mask whose key bias log(size) weighs each token as `size` tokens in
    every softmax (ToMe's proportional attention); [batch, 1, length, length]."""
    return torch.where(allowed_keys(padding), sizes.log().to(dtype)[:, None, None, :], torch.finfo(dtype).min)
