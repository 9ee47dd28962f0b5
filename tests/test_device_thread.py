"""Every run of a Segmenter calls each backend from the same long-lived thread (runtime/device_thread.py):
PyTorch caches cuDNN plans per thread, so a new runner thread per run made eager GPU runs rebuild
them every time (seconds per run_folder/segment call)."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from effiseg.runtime import Segmenter
from effiseg.runtime.backends.base import Backend
from effiseg.runtime.device_thread import DeviceThread
from effiseg.runtime.model_info import ModelInfo
from effiseg.runtime.pipeline import Pipeline


class ThreadRecordingBackend(Backend):
    """Outputs the mean of each image; records the thread of every submit and collect."""
    name = "threads"

    def __init__(self, device="cpu", max_batch=2, delay=0.0):
        super().__init__(ModelInfo(path=None, variant="fake", input_height=8, input_width=8), device, "fp32", max_batch)
        self.delay = delay
        self.buffers = [np.zeros((max_batch, 8, 8, 3), np.uint8) for _ in range(self.n_slots)]
        self.pending = [None] * self.n_slots
        self.threads: list[int] = []

    def host_input(self, slot):
        return self.buffers[slot]

    def submit(self, slot, n):
        self.threads.append(threading.get_ident())
        time.sleep(self.delay)  # a busy device: the other backend gets the next batches
        self.pending[slot] = self.buffers[slot][:n].mean(axis=3).astype(np.float32) - 128

    def collect(self, slot):
        self.threads.append(threading.get_ident())
        out, self.pending[slot] = self.pending[slot], None
        return out


def _images(n=5):
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8) for i in range(n)]


def test_every_run_calls_a_backend_from_the_same_thread_and_each_backend_has_its_own():
    a, b = ThreadRecordingBackend("cuda:0", delay=0.02), ThreadRecordingBackend("cuda:1", delay=0.02)
    seg = Segmenter([a, b], workers=2)
    first = seg.segment(_images(12))
    ran_first = {x.device: set(x.threads) for x in (a, b)}
    second = seg.segment(_images(12))
    assert all(np.array_equal(x, y) for x, y in zip(first, second))
    for x in (a, b):
        assert ran_first[x.device], f"{x.device} got no batch in the first run"
        assert len(set(x.threads)) == 1  # both runs, submit and collect: one thread
        assert threading.get_ident() not in x.threads  # never the caller's thread
    assert set(a.threads) != set(b.threads)
    assert sorted(t.name for t in seg.runner_threads) == ["effiseg-run-cuda:0", "effiseg-run-cuda:1"]
    threads = [t for t in threading.enumerate() if t.name.startswith("effiseg-run-cuda")]
    assert len(threads) == 2
    seg.close()
    for t in threads:
        t.join(5)
        assert not t.is_alive()  # closing the Segmenter ends its device threads


def test_a_folder_run_uses_the_segmenters_device_thread(tmp_path):
    from PIL import Image
    src = tmp_path / "in"
    src.mkdir()
    for i, im in enumerate(_images(3)):
        Image.fromarray(im).save(src / f"{i}.png")
    backend = ThreadRecordingBackend()
    with Segmenter([backend], workers=1) as seg:
        seg.segment(_images(2))
        summary = seg.run_folder(src, tmp_path / "out")
        assert summary["n_ok"] == 3
        assert len(set(backend.threads)) == 1 and backend.threads[0] == seg.runner_threads[0].ident


def test_a_closed_segmenter_refuses_to_run_instead_of_hanging():
    seg = Segmenter([ThreadRecordingBackend()], workers=1)
    seg.segment(_images(1))
    seg.close()
    with pytest.raises(RuntimeError, match="is closed"):
        seg.segment(_images(2))


def test_a_pipeline_without_runner_threads_starts_and_ends_its_own():
    backend = ThreadRecordingBackend()
    before = {t.ident for t in threading.enumerate()}
    pipe = Pipeline([backend], lambda i: (np.zeros((8, 8, 3), np.uint8), i), lambda row, rgb: row.__setitem__(Ellipsis, rgb),
                    lambda i, meta, out: i, lambda i, e, stage: pytest.fail(f"{stage}: {e}"), workers=1)
    assert sorted(i for _, i in pipe.run(range(5))) == list(range(5))
    runner = set(backend.threads)
    assert len(runner) == 1 and not runner & before
    deadline = time.time() + 5
    while any(t.ident in runner for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.02)
    assert not any(t.ident in runner for t in threading.enumerate())
    with pytest.raises(ValueError, match="one runner thread per backend"):
        Pipeline([backend], None, None, None, None, runner_threads=[])


def test_device_thread_runs_calls_in_order_and_hands_back_results_and_errors():
    t = DeviceThread("effiseg-test-device")
    assert t.ident is None  # started by the first call, not before
    seen = []
    futures = [t.submit(seen.append, i) for i in range(20)]
    boom = t.submit(lambda: 1 / 0)
    answer = t.submit(lambda x: x * 2, 21)
    assert answer.result(5) == 42 and seen == list(range(20)) and all(f.result() is None for f in futures)
    with pytest.raises(ZeroDivisionError):
        boom.result()
    ident = t.submit(threading.get_ident).result(5)
    assert ident == t.ident != threading.get_ident()
    t.close(timeout=5)
    t.close()  # twice is harmless
    assert not any(x.ident == ident for x in threading.enumerate())
    with pytest.raises(RuntimeError, match="is closed"):
        t.submit(print)
