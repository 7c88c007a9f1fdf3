"""Token id -> modality, and the per-micro-batch ModalityIndex, against hand-built expectations."""

import pytest
import torch

from megatron_moma.modality import Modality, ModalityIndex, ModalityLayout

LAYOUT = ModalityLayout((Modality("image", 10, 19), Modality("speech", 20, 24)))


def test_modality_of_each_token_id():
    tokens = torch.tensor([[0, 9, 10, 19, 20, 24, 25, 99]])
    assert LAYOUT.modality_ids(tokens).tolist() == [[0, 0, 1, 1, 2, 2, 0, 0]]
    assert LAYOUT.names == ("text", "image", "speech")


def test_index_groups_rows_by_modality_in_sequence_batch_order():
    # [b=2, s=3] -> rows in Megatron's [s, b] order: (s0,b0) (s0,b1) (s1,b0) (s1,b1) (s2,b0) (s2,b1)
    modality_ids = torch.tensor([[1, 0, 2], [0, 1, 1]])
    index = ModalityIndex.from_batch(modality_ids, num_modalities=3)
    assert index.modality_ids.tolist() == [1, 0, 0, 1, 2, 1]
    assert index.counts == [2, 3, 1]
    assert index.offsets == [0, 2, 5, 6]
    assert index.rows(0).tolist() == [1, 2]
    assert index.rows(1).tolist() == [0, 3, 5]
    assert index.rows(2).tolist() == [4]
    assert index.permutation[index.inverse_permutation].tolist() == list(range(6))


def test_sequence_chunks_for_sequence_parallelism():
    modality_ids = torch.tensor([[1, 0, 2, 1], [0, 1, 1, 0]])  # [b=2, s=4] -> 8 rows
    index = ModalityIndex.from_batch(modality_ids, num_modalities=3)
    first, second = index.chunk(0, 2), index.chunk(1, 2)
    assert first.modality_ids.tolist() == [1, 0, 0, 1]  # sequence positions 0-1
    assert second.modality_ids.tolist() == [2, 1, 1, 0]  # sequence positions 2-3
    assert index.chunk_counts(2) == [[2, 2, 0], [1, 2, 1]]
    assert index.chunk(0, 2) is first, "chunks are computed once per micro-batch"
    with pytest.raises(ValueError, match="do not split into 3"):
        index.chunk(0, 3)


def test_a_modality_with_no_token_has_empty_rows():
    index = ModalityIndex.from_batch(torch.zeros(2, 3, dtype=torch.long), num_modalities=2)
    assert index.counts == [6, 0]
    assert index.rows(1).numel() == 0


def test_group_lays_rows_out_by_modality_and_ungroup_restores_token_order():
    modality_ids = torch.tensor([[1, 0, 2], [0, 1, 1]])  # rows (see above): modalities 1 0 0 1 2 1
    index = ModalityIndex.from_batch(modality_ids, num_modalities=3)
    rows = torch.arange(6.0).unsqueeze(1) * torch.tensor([1.0, 10.0])  # [6, 2], row r = (r, 10r)
    grouped = index.group(rows)
    assert grouped[:, 0].tolist() == [1, 2, 0, 3, 5, 4]
    assert [part[:, 0].tolist() for part in index.split(grouped)] == [[1, 2], [0, 3, 5], [4]]
    assert torch.equal(index.ungroup(grouped), rows)


def test_group_and_ungroup_gradients_are_the_inverse_permutations():
    index = ModalityIndex.from_batch(torch.tensor([[1, 0, 2, 0], [0, 1, 1, 2]]), num_modalities=3)
    rows = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(8, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: index.group(x) * weights, (rows,))
    assert torch.autograd.gradcheck(lambda x: index.ungroup(x) * weights, (rows,))
    (index.group(rows) * weights).sum().backward()
    torch.testing.assert_close(rows.grad, weights[index.inverse_permutation])


def test_padding_rows_are_grouped_last_and_get_the_first_weight_set():
    """MoD's batch scope marks padding with the id num_modalities: per-modality layers keep the
    other rows' results and give padding the first set (its outputs are dropped)."""
    from megatron_moma.layers.modality_weights import apply_per_modality

    ids = torch.tensor([1, 2, 0, 2, 1, 0])  # 2 modalities, rows 1 and 3 padding
    index = ModalityIndex(ids, 2)
    assert index.counts == [2, 2, 2] and index.rows(0).tolist() == [2, 5]
    rows = torch.arange(6.0).unsqueeze(1)
    scale = {"text": 10.0, "image": 100.0}
    out = apply_per_modality(lambda name, part: part * scale[name], rows, index, ["text", "image"])
    assert out.squeeze(1).tolist() == [0.0, 10.0, 20.0, 30.0, 400.0, 50.0]
