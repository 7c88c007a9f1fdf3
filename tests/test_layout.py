import pytest

from megatron_moma.parallel.layout import ParallelLayout


def test_names_say_the_layout():
    assert ParallelLayout().name == "ws1"
    assert ParallelLayout(tensor_parallel_size=2, sequence_parallel=True).name == "tp2-sp"
    assert ParallelLayout(pipeline_parallel_size=2, virtual_pipeline_parallel_size=2).name == "pp2-vpp2"
    assert ParallelLayout(tensor_parallel_size=2, sequence_parallel=True, expert_parallel_size=2,
                          expert_tensor_parallel_size=1).name == "tp2-sp-ep2-etp1"


def test_data_parallel_size_takes_the_ranks_left_over():
    assert ParallelLayout().data_parallel_size(4) == 4
    assert ParallelLayout(tensor_parallel_size=2, pipeline_parallel_size=2).data_parallel_size(8) == 2
    assert ParallelLayout(expert_parallel_size=2).data_parallel_size(2) == 2


@pytest.mark.parametrize(
    "layout, world_size, message",
    [
        (ParallelLayout(tensor_parallel_size=2), 3, "not divisible by TP x PP"),
        (ParallelLayout(expert_parallel_size=4), 2, "not divisible by EP x expert-TP x PP"),
    ],
)
def test_a_layout_that_does_not_fit_the_world_is_refused(layout, world_size, message):
    with pytest.raises(ValueError, match=message):
        layout.data_parallel_size(world_size)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sequence_parallel=True), "sequence_parallel needs tensor_parallel_size > 1"),
        (dict(virtual_pipeline_parallel_size=2), "needs pipeline_parallel_size > 1"),
        (dict(tensor_parallel_size=0), "tensor_parallel_size must be >= 1"),
    ],
)
def test_invalid_layouts_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelLayout(**kwargs)
