"""The cut of a batch: everything the compressor does to the sequence the language model reads.

`cut_batch` plans it on the host (which visual tokens each image keeps, pooled or selected by
its strategy), and applies it to the embeddings, the mask, proportional attention's key bias,
the 1-D or 3-D positions and every input that travels with the tokens. It is a function of plain
values: the compressor's config, the adapter, the keep ratio, the seed parts of the draws and
the inputs; STS's wiring (`sts.patch`) calls it from a pre-hook on the language model.

How [B, L] becomes a shorter [B, L']: every old position either goes to one new position or is
dropped. A new position holds one old token (a selection) or several (a pooled window, or merged
row-end newlines): float tensors take the mean of what it holds, integer ones (ids, labels, 1-D or
3-D positions, masks) the values of the old token it stands at (a window's first, the newlines'
last). One `Cut` is applied alike to everything indexed by sequence position, and to tensors
indexed by visual token (e.g. DeepStack features), so nothing can fall out of step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from sts.adapters.base import Adapter
from sts.attention import KEY_BIAS, allowed_keys, key_bias
from sts.attention import install as install_key_bias
from sts.config import VTCConfig
from sts.draws import seeded_generator
from sts.vtc import FEATURE_STRATEGIES, GRID_STRATEGIES, TEXT_STRATEGIES, Context, compress

IGNORE_INDEX = -100  # the label the loss leaves out (transformers' convention)


@dataclass
class Cut:
    target: torch.Tensor  # [B, L]: the new position of each old one, -1 if dropped
    first: torch.Tensor  # [B, L']: the old position each new one stands at (its first; 0 on padding)
    sizes: torch.Tensor  # [B, L']: how many old positions each new one holds (0 on padding)

    @classmethod
    def from_owners(cls, owners: torch.Tensor) -> Cut:
        """owners [B, L]: for each old position, the old position the new token it goes into stands
        at (itself for a token kept alone; a group's first, or merged row ends' last), or -1 if dropped."""
        batch, old_length = owners.shape
        anchors = owners == torch.arange(old_length, device=owners.device)  # the old one each new token stands at
        new_index = anchors.cumsum(1) - 1  # the new position of each anchor
        length = max(1, int(anchors.sum(1).max()))
        live = owners >= 0
        target = torch.where(live, new_index.gather(1, owners.clamp(min=0)), -1)
        rows, columns = anchors.nonzero(as_tuple=True)
        first = torch.zeros(batch, length, dtype=torch.long, device=owners.device)
        first[rows, new_index[rows, columns]] = columns
        flat = (torch.arange(batch, device=owners.device)[:, None] * length + target)[live]
        sizes = torch.zeros(batch * length, device=owners.device).index_add_(
            0, flat, torch.ones_like(flat, dtype=torch.float)
        )
        return cls(target, first, sizes.view(batch, length))

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


@dataclass(frozen=True)
class UnitPlan:
    """One unit's cut, by index among its candidate tokens: which are kept (`live`), the index of
    the first token of each one's group (`anchor`: the group takes its position), and how many
    tokens the unit keeps."""

    live: torch.Tensor
    anchor: torch.Tensor
    kept: int

    @classmethod
    def of(cls, groups: torch.Tensor) -> UnitPlan:
        live, n = groups >= 0, len(groups)
        kept = int(groups.max()) + 1  # every strategy keeps at least one token (`kept_count`)
        first = torch.full((kept,), n).scatter_reduce(0, groups[live], torch.arange(n)[live], "amin")
        return cls(live, first[groups.clamp(min=0)], kept)

    def owners(self, candidates: torch.Tensor) -> torch.Tensor:
        """For each of the unit's (ascending) candidate positions, its group's first position, or -1."""
        return torch.where(self.live, candidates[self.anchor], -1)

    def band_starts(self, cols: int) -> torch.Tensor:
        """The grid rows (ascending) where a kept token's group begins: each starts a band of rows
        whose kept tokens the language model reads as one row."""
        return torch.unique(self.anchor[self.live] // cols)

    def row_end_owners(self, grid: tuple[int, int], ends: torch.Tensor) -> torch.Tensor:
        """For each row's closing token (`ends`: ascending positions, one per grid row), the position
        of the one it merges into: the last of its band's, which comes after all the band's kept tokens
        and before the next band's (rows above the first band join it)."""
        rows, cols = grid
        starts = self.band_starts(cols)
        band = (torch.searchsorted(starts, torch.arange(rows), right=True) - 1).clamp(min=0)
        last = torch.cat([starts[1:] - 1, torch.tensor([rows - 1])])
        return ends[last[band]]


@functools.lru_cache(maxsize=256)
def grid_plan(strategy: str, grid: tuple[int, int], keep_ratio: float) -> UnitPlan:
    """The plan of a strategy that looks at the grid alone: made once, then the same for every image
    of that grid (the cut is planned on the host, once per unit of every step)."""
    blank = torch.empty(grid[0] * grid[1], 0)
    return UnitPlan.of(compress(strategy, blank, grid, keep_ratio, Context(None, torch.Generator())))


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
            ratio = vtc.tile_keep_ratio if unit.tiles and vtc.tile_keep_ratio is not None else keep_ratio
            if vtc.strategy in GRID_STRATEGIES:
                plan = grid_plan(vtc.strategy, tuple(map(int, unit.grid)), ratio)
            else:
                unit_features = (
                    embeds[row, candidates.to(device)]
                    if vtc.strategy in FEATURE_STRATEGIES
                    else torch.empty(len(candidates), 0)
                )  # the others look only at the grid
                context = Context(instructions[row], seeded_generator(*draw, unit_index))
                plan = UnitPlan.of(compress(vtc.strategy, unit_features, unit.grid, ratio, context).cpu())
            owners[row, candidates] = plan.owners(candidates)
            kept_visual += len(positions) - len(candidates) + plan.kept
            if vtc.merge_newlines and unit.row_ends is not None:
                ends = positions[unit.row_ends.cpu()]
                merged = plan.row_end_owners(tuple(map(int, unit.grid)), ends)
                owners[row, ends] = merged
                kept_visual -= len(ends) - len(torch.unique(merged))
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
