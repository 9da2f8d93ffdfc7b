"""A step's inputs in one upload (uploads.py): the lists come back as tensors, and on CPU every upload is
a fresh tensor, since a suspended iteration keeps the inputs of the step that built it."""

import torch

from conserve.uploads import Uploader


def test_lists_come_back_as_tensors_of_one_upload():
    up = Uploader(torch.device("cpu"))
    ids, empty, pos = up.upload([[5, 6, 7], [], [0, 1, 2]])
    assert ids.tolist() == [5, 6, 7] and pos.tolist() == [0, 1, 2] and empty.numel() == 0
    assert ids.dtype == torch.int64 and ids.untyped_storage().data_ptr() == pos.untyped_storage().data_ptr()
    temps = up.one([0.5, 1.0], torch.float32)
    assert temps.dtype == torch.float32 and temps.tolist() == [0.5, 1.0]


def test_an_earlier_upload_is_never_overwritten():
    up = Uploader(torch.device("cpu"))
    first = up.one([1, 2, 3])
    for i in range(20):
        up.one([i, i, i])
    assert first.tolist() == [1, 2, 3]
