"""Every run of a Segmenter calls each backend from the same long-lived thread (runtime/device_thread.py):
PyTorch caches cuDNN plans per thread, so a new runner thread per run made eager GPU runs rebuild
them every time (seconds per run_folder/segment call)."""
from __future__ import annotations

import sys
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
        self.threads: list[threading.Thread] = []  # objects, not idents: idents are reused

    def host_input(self, slot):
        return self.buffers[slot]

    def submit(self, slot, n):
        self.threads.append(threading.current_thread())
        time.sleep(self.delay)  # a busy device: the other backend gets the next batches
        self.pending[slot] = self.buffers[slot][:n].mean(axis=3).astype(np.float32) - 128

    def collect(self, slot):
        self.threads.append(threading.current_thread())
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
    for x, runner in zip((a, b), seg.runner_threads):
        assert ran_first[x.device], f"{x.device} got no batch in the first run"
        assert set(x.threads) == {runner.thread}  # both runs, submit and collect: its one thread
        assert threading.current_thread() not in x.threads  # never the caller's thread
    assert a.threads[0] is not b.threads[0]
    assert [t.name for t in seg.runner_threads] == ["effiseg-run-cuda:0", "effiseg-run-cuda:1"]
    threads = [t.thread for t in seg.runner_threads]
    seg.close()
    assert not any(t.is_alive() for t in threads)  # closing the Segmenter ends its device threads


def test_a_segmenter_dropped_without_close_is_freed_and_its_thread_ends():
    import gc
    import weakref
    backend = ThreadRecordingBackend()
    seg = Segmenter([backend], workers=1)
    seg.segment(_images(3))
    thread = seg.runner_threads[0].thread
    seg_ref, backend_ref = weakref.ref(seg), weakref.ref(backend)
    del seg, backend
    gc.collect()
    assert seg_ref() is None and backend_ref() is None  # the idle thread holds nothing of them
    thread.join(5)
    assert not thread.is_alive()


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no fork on this OS (Windows)")
def test_a_forked_child_runs_its_segmenter_on_a_thread_of_its_own():
    import os
    seg = Segmenter([ThreadRecordingBackend()], workers=1)
    expected = seg.segment(_images(2))
    pid = os.fork()
    if pid == 0:  # the child: its copy of the device thread object has no thread behind it
        code = 1
        try:
            import signal
            signal.alarm(20)  # a hang fails the test instead of blocking it
            got = seg.segment(_images(2))
            code = 0 if all(np.array_equal(x, y) for x, y in zip(got, expected)) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    seg.close()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


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
        assert set(backend.threads) == {seg.runner_threads[0].thread}


def test_a_closed_segmenter_refuses_to_run_instead_of_hanging():
    seg = Segmenter([ThreadRecordingBackend()], workers=1)
    seg.segment(_images(1))
    seg.close()
    with pytest.raises(RuntimeError, match="is closed"):
        seg.segment(_images(2))


def test_a_pipeline_without_runner_threads_starts_and_ends_its_own():
    backend = ThreadRecordingBackend()
    before = set(threading.enumerate())
    pipe = Pipeline([backend], lambda i: (np.zeros((8, 8, 3), np.uint8), i), lambda row, rgb: row.__setitem__(Ellipsis, rgb),
                    lambda i, meta, out: i, lambda i, e, stage: pytest.fail(f"{stage}: {e}"), workers=1)
    assert sorted(i for _, i in pipe.run(range(5))) == list(range(5))
    runner = set(backend.threads)
    assert len(runner) == 1 and not runner & before
    (thread,) = runner
    thread.join(5)
    assert not thread.is_alive()
    with pytest.raises(ValueError, match="one runner thread per backend"):
        Pipeline([backend], None, None, None, None, runner_threads=[])


def test_device_thread_runs_calls_in_order_and_hands_back_results_and_errors():
    t = DeviceThread("effiseg-test-device")
    assert t.thread is None  # started by the first call, not before
    seen = []
    futures = [t.submit(seen.append, i) for i in range(20)]
    boom = t.submit(lambda: 1 / 0)
    answer = t.submit(lambda x: x * 2, 21)
    assert answer.result(5) == 42 and seen == list(range(20)) and all(f.result() is None for f in futures)
    assert t.call(lambda x: x + 1, 41) == 42  # submit and wait in one
    with pytest.raises(ZeroDivisionError):
        boom.result()
    assert t.thread is not None
    ran_on = t.submit(threading.current_thread).result(5)
    assert ran_on is t.thread and ran_on is not threading.current_thread()
    t.close(timeout=5)
    t.close()  # twice is harmless
    assert not ran_on.is_alive()
    with pytest.raises(RuntimeError, match="is closed"):
        t.submit(print)


def test_the_thread_probe_runs_its_four_measurements_and_writes_them(tiny_checkpoint, tmp_path):
    """benchmarks/lab/thread_probe.py: a fresh thread against the device thread (no timing assertions)."""
    import json

    from click.testing import CliRunner
    from PIL import Image

    from effiseg.benchmarks.lab.thread_probe import main
    folder = tmp_path / "images"
    folder.mkdir()
    for i, im in enumerate(_images(3)):
        Image.fromarray(im).save(folder / f"{i}.png")
    out = tmp_path / "probe.json"
    res = CliRunner().invoke(main, ["--checkpoint", str(tiny_checkpoint), "--images", str(folder), "--batch", "2",
                                    "--rounds", "2", "--threads", "1", "--output", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    data = json.loads(out.read_text())
    assert data["batch"] == 2 and data["images_per_run"] == 3 and data["device"] == "cpu"
    assert {k: len(v) for k, v in data["samples"].items()} == {
        "batch_fresh_thread_s": 2, "batch_device_thread_s": 2, "run_fresh_thread_s": 2, "run_device_thread_s": 2}
    assert all(v > 0 for v in data["fresh_over_device_thread"].values())
    faults = data["minor_page_faults"]
    assert set(faults) == {"batch_fresh_thread", "batch_device_thread", "run_fresh_thread", "run_device_thread"}
    if sys.platform.startswith("linux"):  # counted per thread there
        assert all(len(v) == 2 and all(isinstance(x, int) and x >= 0 for x in v) for v in faults.values())
    assert "fresh/device" in res.output and "segment() of 3 images" in res.output
    # The probe's temporary runner threads are gone; only what was running before may remain.
    assert not [t for t in threading.enumerate() if t.name in ("effiseg-probe-run", "effiseg-probe-fresh")]
