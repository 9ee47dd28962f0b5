"""Round 2 of the host pipeline (issue 23): writers take whole chunks of a batch and hand their
results back together (``Pipeline.run_batches``), and masks are written with os-level calls
(``images.write_whole``). What callers rely on: every job's result exactly once, a failure
reported on its own, files replaced whole with no temporary left behind."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from effiseg.runtime.backends.base import Backend
from effiseg.runtime.images import TEMP_SUFFIX, write_mask_png, write_whole
from effiseg.runtime.model_info import ModelInfo
from effiseg.runtime.pipeline import Pipeline


class _RowValues(Backend):
    """Output = each row's first pixel value, at once."""
    name = "fake"

    def __init__(self, max_batch):
        super().__init__(ModelInfo(path=None, variant="fake", input_height=4, input_width=4), "cpu", "fp32",
                         max_batch, 2)
        self.buffers = [np.zeros((max_batch, 4, 4, 3), np.uint8) for _ in range(2)]
        self.pending = [None] * 2

    def host_input(self, slot):
        return self.buffers[slot]

    def submit(self, slot, n):
        self.pending[slot] = self.buffers[slot][:n, :, :, 0].astype(np.float32)

    def collect(self, slot):
        out, self.pending[slot] = self.pending[slot], None
        return out


def _load(i):
    if i == 5:
        raise ValueError("unreadable")
    return i, None


def test_results_come_in_writer_chunks_each_job_once():
    pipe = Pipeline([_RowValues(max_batch=4)], _load, lambda row, v: row.__setitem__(Ellipsis, v),
                    lambda i, meta, out: int(out[0, 0]), lambda i, err, stage: f"{stage}: {err}",
                    workers=1, writers=2)
    lists = list(pipe.run_batches(range(20)))
    results = [item for chunk in lists for item in chunk]
    assert sorted(i for i, _ in results) == list(range(20))
    assert dict(results)[5] == "read: unreadable" and [(5, "read: unreadable")] in lists  # alone
    assert all(value == i for i, value in results if i != 5)
    assert max(len(chunk) for chunk in lists) == 2  # a batch of 4 split over 2 writers
    assert pipe.stats.images == 20


def test_write_whole_replaces_a_longer_file_and_makes_a_missing_folder(tmp_path):
    target = tmp_path / "sub" / "deeper" / "mask.png"
    for data in (b"a longer first version", b"short"):
        write_whole(target, data)
        assert target.read_bytes() == data and [p.name for p in target.parent.iterdir()] == ["mask.png"]


def test_write_whole_leaves_no_temporary_when_the_rename_fails(tmp_path):
    (tmp_path / "taken").mkdir()  # a folder where the file should go: the rename fails
    (tmp_path / "taken" / "inside").write_text("x")
    with pytest.raises(OSError):
        write_whole(tmp_path / "taken", b"data")
    assert not list(tmp_path.glob(f"*{TEMP_SUFFIX}"))


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.float32])
def test_mask_png_of_any_mask_dtype_reads_back_0_255(tmp_path, dtype):
    mask = np.random.default_rng(0).random((9, 13)) > 0.5
    write_mask_png(tmp_path / "m.png", (mask * 3).astype(dtype))
    back = np.asarray(Image.open(io.BytesIO((tmp_path / "m.png").read_bytes())))
    np.testing.assert_array_equal(back, mask.astype(np.uint8) * 255)
