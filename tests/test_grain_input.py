"""The training input on grain (`train.data`): which examples each step reads (every example once per epoch
of its group; --data-weights and --balance-prompts honoured), the same batches whatever --workers and
wherever a run resumes, each process its own slice of the global batch, and the data state a checkpoint
keeps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import make_dataset, tiny_config

from paliseg.tokenizer import Tokenizer
from train import data as train_data
from train import run as run_folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "set")


def _data(folder: Path, process: int = 0, processes: int = 1, **changes) -> train_data.TrainData:
    config = tiny_config(folder, "/unused", **changes)
    return train_data.TrainData(
        config, Tokenizer(run_folder.model_config(config).tokenizer_path), 16, process, processes
    )


def _assert_same(got: list, expected: list) -> None:
    assert [step for step, _, _ in got] == [step for step, _, _ in expected]
    for (_, ids, batch), (_, expected_ids, expected_batch) in zip(got, expected):
        np.testing.assert_array_equal(ids, expected_ids)
        assert batch.keys() == expected_batch.keys()
        for key, value in expected_batch.items():
            np.testing.assert_array_equal(batch[key], value, err_msg=key)


def test_every_example_once_per_epoch_in_a_new_order(dataset):
    data = _data(dataset, batch_size=4)  # 12 examples: an epoch is 3 steps
    drawn = np.concatenate([data.example_ids(step).ravel() for step in range(9)]).reshape(3, 12)
    for epoch in drawn:
        assert sorted(epoch.tolist()) == list(range(12))
    assert len({tuple(epoch) for epoch in drawn}) == 3  # reshuffled every epoch
    other_seed = np.concatenate([_data(dataset, batch_size=4, seed=1).example_ids(step).ravel() for step in range(3)])
    assert sorted(other_seed.tolist()) == list(range(12)) and (other_seed != drawn[0]).any()


def test_weighted_folders_and_balanced_prompts(tmp_path):
    big = make_dataset(tmp_path / "big", count=30, prompts=("segment crack",))
    small = make_dataset(tmp_path / "small", count=3, seed=1, prompts=("segment taping area",))

    def drawn(**changes) -> np.ndarray:
        data = _data(big, data=[str(big), str(small)], batch_size=10, **changes)
        return np.concatenate([data.example_ids(step).ravel() for step in range(40)])  # ids >= 30: small

    uniform = drawn()  # one group of 33 examples
    assert np.mean(uniform >= 30) == pytest.approx(3 / 33, abs=0.01)
    assert sorted(uniform[:33].tolist()) == list(range(33))
    for changes, share in (({"balance_prompts": True}, 0.5), ({"data_weights": [3.0, 1.0]}, 0.25)):
        ids = drawn(**changes)
        assert np.mean(ids >= 30) == pytest.approx(share, abs=0.01), changes
        for members in (ids[ids >= 30], ids[ids < 30]):  # each group cycles through whole epochs
            counts = np.bincount(members - members.min())
            assert counts.max() - counts.min() <= 1, changes


def test_batches_do_not_depend_on_workers_or_where_a_run_resumes(dataset):
    """A run resumed at any step reads the uninterrupted run's batches, with 0, 1 or 2 worker processes,
    and the loaded batch of a step is the one `batch` and `example_ids` give in the calling thread."""
    config = dict(batch_size=4, grad_accum=2)
    whole = list(_data(dataset, workers=0, **config).iterate(0, 6))
    reference = _data(dataset, **config)
    for step, ids, batch in whole:
        np.testing.assert_array_equal(ids, reference.example_ids(step))
        _assert_same([(step, ids, reference.batch(step))], [(step, ids, batch)])
    assert whole[0][2]["image"].shape == (2, 2, 16, 16, 3) and whole[0][2]["tokens"].shape == (2, 2, 48)
    for start in range(6):
        _assert_same(list(_data(dataset, workers=0, **config).iterate(start, 6)), whole[start:])
    for workers in (1, 2):
        _assert_same(list(_data(dataset, workers=workers, prefetch=1, **config).iterate(2, 6)), whole[2:])


def test_each_process_reads_its_slice_of_the_global_batch(dataset):
    whole = list(_data(dataset, batch_size=8, grad_accum=2, workers=0).iterate(3, 6))
    halves = [
        list(_data(dataset, process, 2, batch_size=8, grad_accum=2, workers=0).iterate(3, 6)) for process in (0, 1)
    ]
    for (step, ids, batch), first, second in zip(whole, *halves):
        assert first[0] == second[0] == step
        assert ids.shape == (2, 4) and first[1].shape == (2, 2)
        np.testing.assert_array_equal(np.concatenate([first[1], second[1]], axis=1), ids)
        for key, value in batch.items():
            np.testing.assert_array_equal(np.concatenate([first[2][key], second[2][key]], axis=1), value)


def test_the_data_state_is_the_position_in_the_sample_order(dataset):
    data = _data(dataset, batch_size=4, workers=3)
    assert data.state(5) == {"global_next_index": 20}  # nothing of --workers or the process count
    assert _data(dataset, 1, 2, batch_size=4, workers=0).state(5) == data.state(5)
    data.check_state(data.state(5), 5)
    data.check_state(None, 5)  # a checkpoint written before data states were saved: resumes from its step
    with pytest.raises(ValueError, match=r"checkpoint 5: its data state .* is not that of step 5"):
        data.check_state(data.state(4), 5)
