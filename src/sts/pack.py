"""Packed sequences for the language model: the batch's samples as one padding-free row.

After the cut, rows have other lengths and a padded batch wastes the language model's work on
padding. Packing hands it one row [1, T] of every sample's real tokens instead, each sample
attending only to itself: varlen kernels (FlashAttention) take the samples' cumulative lengths,
every other kernel a block-diagonal causal mask. Position ids travel with the tokens (1-D, or
Qwen's 3-D M-RoPE rows), so kept tokens keep their positions, and rows indexed by visual
position (DeepStack's) keep their row-major order, which packing does not change.

Which sample each position belongs to (`sample_ids`) comes from the padded batch's rows, or,
for a batch a flattening collator already packed (one row, no attention mask, position ids that
restart at 0 for each sample), from those restarts: a cut leaves gaps in the positions, after
which transformers could no longer tell the samples apart on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sts.attention import KEY_BIAS

VARLEN_KERNELS = ("flash_attention_2", "flash_attention_3", "flash_attention_4")
ADDITIVE_MASK_KERNELS = ("eager", "flex_attention")  # add a tensor mask to the scores (a boolean one would not mask)


def sample_ids(lm_inputs: dict, attention_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor:
    """[B, L]: the sample each position belongs to, -1 on padding."""
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError("sts: packing needs a 2-D (padding) attention mask, not a 4-D one")
    positions = lm_inputs.get("position_ids")
    if attention_mask is None and batch == 1 and positions is not None:
        starts = (positions.reshape(-1, batch, length) == 0).all(0)
        if starts[0, 1:].any():  # a flattened batch: each sample starts again at position 0
            return starts.long().cumsum(-1) - 1
    rows = torch.arange(batch, device=lm_inputs["inputs_embeds"].device)[:, None].expand(batch, length)
    return rows if attention_mask is None else rows.masked_fill(~attention_mask.bool(), -1)


def is_flattened(samples: torch.Tensor) -> bool:
    """Whether one row holds several samples (a flattening collator's batch)."""
    return samples.shape[0] == 1 and bool(samples.max() > 0)


@dataclass
class Packing:
    real: torch.Tensor  # [B, L]: positions that go into the packed row
    samples: torch.Tensor  # [T]: the sample of each packed position

    @classmethod
    def of(cls, samples: torch.Tensor) -> Packing:
        real = samples >= 0
        return cls(real, samples[real])

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, ...] -> [1, T, ...]."""
        return x[self.real][None]

    def positions(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., B, L] (any leading dims: 3-D positions) -> [..., 1, T]."""
        return x[..., self.real].unsqueeze(-2)

    def starts(self) -> torch.Tensor:
        """[T] True at the first position of every sample."""
        return torch.cat([self.samples.new_ones(1, dtype=torch.bool), self.samples[1:] != self.samples[:-1]])

    def labels(self, labels: torch.Tensor, ignore: int) -> torch.Tensor:
        """[B, L] -> [1, T]; a sample's first label ignored, so that the loss's shift never scores a
        sample's last token predicting the next sample's first."""
        return self.rows(labels).masked_fill(self.starts()[None], ignore)


def pack(lm_inputs: dict, samples: torch.Tensor, attention: str, sequence_kwargs: tuple[str, ...], key_bias=None):
    """The language model's inputs as one padding-free row of samples, and the packing. `key_bias`
    [B, L]: proportional attention's for eager attention (a float mask); other kernels carry theirs
    as an input, packed here like the tokens."""
    packing = Packing.of(samples)
    batch, length = samples.shape
    out = dict(lm_inputs)
    out["inputs_embeds"] = packing.rows(lm_inputs["inputs_embeds"])
    positions = lm_inputs.get("position_ids")
    if positions is None:
        positions = torch.arange(length, device=samples.device).expand(batch, -1)
    out["position_ids"] = packing.positions(positions)
    for name in (*sequence_kwargs, KEY_BIAS):
        if lm_inputs.get(name) is not None:
            out[name] = packing.rows(lm_inputs[name])
    if lm_inputs.get("cache_position") is not None:
        out["cache_position"] = torch.arange(len(packing.samples), device=samples.device)
    out.update(packed_attention(packing, attention, out["inputs_embeds"].dtype, key_bias))
    return out, packing


def packed_attention(packing: Packing, attention: str, dtype: torch.dtype, key_bias=None) -> dict:
    """Each sample attends only to itself: cumulative lengths for varlen kernels, FlexAttention's block
    mask on a GPU, else a block-diagonal causal 4-D mask: boolean, or additive float for the kernels
    that add a tensor mask to the scores, with proportional attention's key bias where given."""
    samples = packing.samples
    if attention in VARLEN_KERNELS:
        lengths = torch.bincount(samples - samples.min())
        cumulative = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
        longest = int(lengths.max())
        return {
            "attention_mask": None,
            "cu_seq_lens_q": cumulative,
            "cu_seq_lens_k": cumulative,
            "max_length_q": longest,
            "max_length_k": longest,
        }
    if attention == "flex_attention" and key_bias is None and samples.device.type != "cpu":
        # (on a CPU, torch 2.13's compiled FlexAttention fails to build this mask's kernel: a dense one there)
        return {"attention_mask": document_block_mask(samples)}
    total = len(samples)
    allowed = (samples[:, None] == samples[None, :]) & torch.ones(total, total, dtype=torch.bool).tril().to(
        samples.device
    )
    if key_bias is None and attention not in ADDITIVE_MASK_KERNELS:
        return {"attention_mask": allowed[None, None]}
    bias = torch.zeros(total, dtype=dtype, device=samples.device) if key_bias is None else packing.rows(key_bias)[0]
    bias = bias.to(dtype)
    return {"attention_mask": torch.where(allowed, bias[None, :], torch.finfo(dtype).min)[None, None]}


def document_block_mask(samples: torch.Tensor):
    """FlexAttention's block-sparse mask of packed samples: blocks that mix two samples are skipped,
    not computed and masked, so packing costs no attention beyond each sample's own."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_sample_causal(batch, head, query, key):
        return (samples[query] == samples[key]) & (query >= key)

    total = len(samples)
    return create_block_mask(same_sample_causal, None, None, total, total, device=samples.device)
