"""Proportional attention on any attention kernel: the key bias rides in one more head dimension.

ToMe's proportional attention adds log(size) to the score of every key that stands for `size`
pooled tokens, so each softmax weighs it as that many tokens. As an additive mask it needs a
materialised [B, 1, L, L] float tensor, which FlashAttention, SDPA's flash path and FlexAttention
cannot take. The same bias is exact in any causal kernel when every head gets one more
dimension: the query holds 1, the key log(size) / scale, the value 0, so that
q'.k' * scale = q.k * scale + log(size), and the output's extra dimension is 0 and dropped. The
extra dimension is padded with zeros to a multiple of 8, which fused kernels need.

`install` wraps transformers' registered attention function of one implementation, once. The
wrapper does this only in a call that carries `sts_key_bias` ([B, L], the cut hands it to the
language model, whose layers pass it on to their attention); every other call, in any model,
is the original function's.
"""

from __future__ import annotations

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

KEY_BIAS = "sts_key_bias"
MULTIPLE = 8


def allowed_keys(real: torch.Tensor) -> torch.Tensor:
    """[B, L] real (not padding) positions -> [B, 1, L, L]: the keys each query may read, causally."""
    length = real.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=real.device).tril()
    return causal[None, None] & real.bool()[:, None, None, :]


def key_bias(sizes: torch.Tensor) -> torch.Tensor:
    """[B, L'] tokens each new position holds -> its key bias log(size) (0 on padding, masked anyway)."""
    return sizes.clamp(min=1).log()


def with_key_bias(attention):
    """`attention` (a transformers attention function) that adds a per-key bias when given one."""

    def attention_with_key_bias(module, query, key, value, attention_mask, **kwargs):
        bias = kwargs.pop(KEY_BIAS, None)
        if bias is None:
            return attention(module, query, key, value, attention_mask, **kwargs)
        head_dim = query.shape[-1]
        kwargs["scaling"] = kwargs.get("scaling") or head_dim**-0.5
        extra = MULTIPLE - head_dim % MULTIPLE

        def widened(x, first):
            column = x.new_zeros(*x.shape[:-1], extra)
            column[..., :1] = first
            return torch.cat([x, column], dim=-1)

        keys = (bias / kwargs["scaling"]).to(key.dtype)[:, None, :, None].expand(*key.shape[:-1], 1)
        output, weights = attention(
            module, widened(query, 1.0), widened(key, keys), widened(value, 0.0), attention_mask, **kwargs
        )
        return output[..., :head_dim], weights

    attention_with_key_bias.sts_wraps = attention
    return attention_with_key_bias


def install(implementation: str) -> None:
    """Let `implementation`'s registered attention function take `sts_key_bias` (idempotent)."""
    if implementation not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(
            f"vtc.proportional_attention: attention {implementation!r} is not registered in transformers' "
            "AttentionInterface; use sdpa, flash_attention_2, flex_attention or eager"
        )
    current = ALL_ATTENTION_FUNCTIONS[implementation]
    if not hasattr(current, "sts_wraps"):
        ALL_ATTENTION_FUNCTIONS.register(implementation, with_key_bias(current))
