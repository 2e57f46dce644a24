"""`sts.pack`'s pieces on hand-made inputs (whole models packed: `test_families`)."""

import torch
from torch.nn.attention.flex_attention import BlockMask

from sts.pack import Packing, document_block_mask, is_flattened, packed_attention, sample_ids

EMBEDS = torch.zeros(2, 5, 4)


def test_a_padded_batchs_samples_are_its_rows_without_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    samples = sample_ids({"inputs_embeds": EMBEDS}, mask, 2, 5)
    assert samples.tolist() == [[0, 0, 0, -1, -1], [1, 1, 1, 1, 1]]
    assert not is_flattened(samples)


def test_a_flattened_batchs_samples_start_where_positions_restart_in_every_row_of_them():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    samples = sample_ids({"inputs_embeds": EMBEDS[:1], "position_ids": positions}, None, 1, 6)
    assert samples.tolist() == [[0, 0, 0, 1, 1, 2]] and is_flattened(samples)
    m_rope = torch.stack([positions, positions, torch.tensor([[0, 1, 2, 0, 3, 0]])])  # a visual row at 4
    samples = sample_ids({"inputs_embeds": EMBEDS[:1], "position_ids": m_rope}, None, 1, 6)
    assert samples.tolist() == [[0, 0, 0, 1, 1, 2]]


def test_varlen_kernels_get_the_samples_cumulative_lengths_and_no_mask():
    packing = Packing.of(torch.tensor([[0, 0, 0, -1], [1, 1, -1, -1]]))
    arguments = packed_attention(packing, "flash_attention_2", torch.float32)
    assert arguments["attention_mask"] is None
    assert arguments["cu_seq_lens_q"].tolist() == arguments["cu_seq_lens_k"].tolist() == [0, 3, 5]
    assert arguments["max_length_q"] == arguments["max_length_k"] == 3


def test_other_kernels_get_a_block_diagonal_causal_mask():
    packing = Packing.of(torch.tensor([[0, 0, -1], [1, 1, 1]]))
    mask = packed_attention(packing, "sdpa", torch.float32)["attention_mask"][0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]])
    assert torch.equal(mask, expected.bool())
    for additive in ("eager", "flex_attention"):  # FlexAttention on a CPU: both add a tensor mask to the scores
        mask = packed_attention(packing, additive, torch.float32)["attention_mask"][0, 0]
        assert torch.equal(mask == 0, expected.bool())  # 0 where allowed, the dtype's min elsewhere


def test_flex_attentions_block_mask_skips_what_crosses_samples():
    """What FlexAttention gets on a GPU (tests/test_gpu.py trains with it; on a CPU, the dense mask)."""
    packing = Packing.of(torch.tensor([[0] * 200 + [-1] * 56, [1] * 256]))
    mask = document_block_mask(packing.samples)
    dense = packed_attention(packing, "sdpa", torch.float32)["attention_mask"]
    assert isinstance(mask, BlockMask) and mask.shape == dense.shape
    query, key = torch.meshgrid(torch.arange(456), torch.arange(456), indexing="ij")
    assert torch.equal(mask.mask_mod(0, 0, query, key), dense[0, 0])
    one_sample = document_block_mask(torch.zeros(456, dtype=torch.long))
    assert mask.sparsity() > one_sample.sparsity()  # blocks across samples are never computed


def test_each_samples_first_label_is_ignored_so_no_sample_predicts_the_next():
    packing = Packing.of(torch.tensor([[0, 0, 0], [1, 1, -1]]))
    labels = torch.tensor([[5, 6, 7], [8, 9, -100]])
    assert packing.labels(labels, -100).tolist() == [[-100, 6, 7, -100, 9]]
