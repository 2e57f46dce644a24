"""The cut of a padded batch of sequences: how [B, L] becomes a shorter [B, L'].

Every old position either goes to one new position or is dropped. A new position holds one
old token (a selection) or several (a pooled window): float tensors take the mean of what it
holds, integer ones (ids, labels, 1-D or 3-D positions, masks) the values of its first old
token. One `Cut` is applied alike to everything indexed by sequence position, and to tensors
indexed by visual token (e.g. DeepStack features), so nothing can fall out of step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Cut:
    target: torch.Tensor  # [B, L]: the new position of each old one, -1 if dropped
    first: torch.Tensor  # [B, L']: the first old position each new one holds (0 on padding)
    sizes: torch.Tensor  # [B, L']: how many old positions each new one holds (0 on padding)

    @classmethod
    def from_owners(cls, owners: torch.Tensor) -> "Cut":
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

    def to(self, device) -> "Cut":
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
