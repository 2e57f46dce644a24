"""`sts.pack`'s pieces on hand-made inputs (whole models packed: `test_families`)."""

import torch

from sts.pack import Packing, is_flattened, packed_attention, sample_ids

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
    eager = packed_attention(packing, "eager", torch.float32)["attention_mask"][0, 0]
    assert torch.equal(eager == 0, expected.bool())  # additive: 0 where allowed, the dtype's min elsewhere


def test_each_samples_first_label_is_ignored_so_no_sample_predicts_the_next():
    packing = Packing.of(torch.tensor([[0, 0, 0], [1, 1, -1]]))
    labels = torch.tensor([[5, 6, 7], [8, 9, -100]])
    assert packing.labels(labels, -100).tolist() == [[-100, 6, 7, -100, 9]]
