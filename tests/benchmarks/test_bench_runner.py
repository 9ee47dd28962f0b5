"""effiseg-bench's interleaved runner, with a test double backend: rounds, threads per backend,
memory accounting, deadlines, end-to-end warm-up, failures. No timing assertions."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from effiseg.benchmarks.runner import BackendPool, Config, IterationPlan, ModelOnly, run_rounds
from effiseg.benchmarks.targets import TARGETS, Target
from effiseg.runtime.backends.base import Backend
from effiseg.runtime.model_info import ModelInfo


# -- the runner with a test double ---------------------------------------------------------------

class RecordingBackend(Backend):
    """Doubles the output of a uint8 batch; logs every submit so the test sees the visiting order."""
    name = "double"

    def __init__(self, info, max_batch, log, tag, fail_after=None):
        super().__init__(info, "cpu", "fp32", max_batch)
        self.buffers = [np.zeros((max_batch, info.input_height, info.input_width, 3), np.uint8)
                        for _ in range(self.n_slots)]
        self.out = [None] * self.n_slots
        self.log, self.tag, self.fail_after, self.calls = log, tag, fail_after, 0

    def host_input(self, slot):
        return self.buffers[slot]

    def submit(self, slot, n):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("device lost")
        self.log.append(self.tag)
        self.out[slot] = self.buffers[slot][:n, :, :, 0].astype(np.float32) * 2

    def collect(self, slot):
        return self.out[slot]


def _targets():
    return [Target(TARGETS["torch-eager"], "cpu"), Target(TARGETS["ort-cpu"], "cpu")]


def test_rounds_interleave_configurations_and_count_samples():
    info = ModelInfo(path=None, variant="test", input_height=8, input_width=8)
    calls: list[str] = []

    def factory(target, fmt, batch, size):
        return RecordingBackend(info, batch, calls, f"{target.name}/b{batch}")

    pool = BackendPool(factory, log=lambda m: None)
    configs = [Config("model", t, b, 8, 8, "uint8-nhwc") for b in (1, 2) for t in _targets()]
    results = run_rounds([ModelOnly(c, pool) for c in configs], rounds=3, warmup=2,
                         plan=IterationPlan(iters=2), log=lambda m: None)
    pool.close()
    tags = [f"{c.target.name}/b{c.batch_size}" for c in configs]
    warm, timed = calls[:8], calls[8:]
    assert warm == [t for t in tags for _ in range(2)]
    # Round r visits the configurations rotated by r, two samples each.
    expected = []
    for r in range(3):
        order = tags[r:] + tags[:r]
        expected += [t for t in order for _ in range(2)]
    assert timed == expected
    for res, cfg in zip(results, configs):
        assert res["key"] == cfg.key and res["error"] is None
        assert len(res["samples_ms"]) == 6 and len(res["round_p50_ms"]) == 3
        assert res["latency"]["samples"] == 6
        assert res["bytes_in_per_image"] == 8 * 8 * 3 and res["bytes_out_per_image"] == 8 * 8 * 4
        assert res["latency_with_host_prep"]["p50_ms"] >= res["latency"]["p50_ms"] * 0.999


def test_each_backend_is_built_and_timed_on_a_thread_of_its_own():
    """As the runtime drives each backend from its own device thread; measurements that share a
    backend (model-only, compute) share its thread."""
    info = ModelInfo(path=None, variant="test", input_height=8, input_width=8)
    seen: dict[str, set] = {}

    class ThreadNotingBackend(RecordingBackend):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.setdefault(self.tag, set()).add(threading.current_thread())  # built here

        def submit(self, slot, n):
            seen[self.tag].add(threading.current_thread())
            super().submit(slot, n)

    pool = BackendPool(lambda target, fmt, batch, size: ThreadNotingBackend(info, batch, [], f"{target.name}/b{batch}"),
                       log=lambda m: None)
    configs = [Config("model", t, b, 8, 8, "uint8-nhwc") for b in (1, 2) for t in _targets()]
    results = run_rounds([ModelOnly(c, pool) for c in configs], rounds=2, warmup=1, plan=IterationPlan(iters=2),
                         log=lambda m: None)
    pool.close()
    assert all(r["error"] is None for r in results)
    assert len(seen) == 4 and all(len(threads) == 1 for threads in seen.values())
    threads = [next(iter(t)) for t in seen.values()]
    assert len(set(threads)) == 4 and threading.current_thread() not in threads
    assert not any(t.is_alive() for t in threads)  # ended with the run


def test_ctrl_c_leaves_open_a_backend_whose_call_has_not_returned(monkeypatch):
    """Closing a backend while its thread is still inside submit would free (device) memory under
    running work; the others are closed as usual."""
    import _thread
    from effiseg.benchmarks import runner
    monkeypatch.setattr(runner, "CLOSE_WAIT_S", 0.3)
    info = ModelInfo(path=None, variant="test", input_height=8, input_width=8)
    entered, release, closed = threading.Event(), threading.Event(), []

    class HangingBackend(RecordingBackend):
        def submit(self, slot, n):
            if self.tag == "ort-cpu" and self.calls >= 1:  # the first timed batch never returns...
                entered.set()
                release.wait(20)  # ...until the test lets it
            super().submit(slot, n)

        def close(self):
            closed.append(self.tag)

    pool = BackendPool(lambda target, fmt, batch, size: HangingBackend(info, batch, [], target.name),
                       log=lambda m: None)
    configs = [Config("model", t, 1, 8, 8, "uint8-nhwc") for t in _targets()]
    threading.Thread(target=lambda: entered.wait(20) and _thread.interrupt_main(), daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C while ort-cpu's round is running
            run_rounds([ModelOnly(c, pool) for c in configs], rounds=2, warmup=1, plan=IterationPlan(iters=1),
                       log=lambda m: None)
        assert pool.left_open == {configs[1].backend_key}
        pool.close()
        assert closed == ["torch-eager"]
    finally:
        release.set()


def test_host_memory_added_is_the_configurations_own():
    """The process's peak RSS includes every backend the interleaved run keeps loaded; the added
    figure is what building and warming up this configuration took."""
    info = ModelInfo(path=None, variant="test", input_height=8, input_width=8)

    class HeavyBackend(RecordingBackend):
        ballast = None

        def submit(self, slot, n):
            # Like a backend that sizes its workspace on its first batch (warm-up): 96 MiB, touched.
            if self.tag == "torch-eager" and self.ballast is None:
                self.ballast = np.ones(96 * 2**20, np.uint8)
            super().submit(slot, n)

    pool = BackendPool(lambda target, fmt, batch, size: HeavyBackend(info, batch, [], target.name), log=lambda m: None)
    configs = [Config("model", t, 1, 8, 8, "uint8-nhwc") for t in _targets()]
    results = run_rounds([ModelOnly(c, pool) for c in configs], rounds=1, warmup=1, plan=IterationPlan(iters=1),
                         log=lambda m: None)
    pool.close()
    heavy, light = (r["memory"] for r in results)
    if heavy["host_rss_added_mb"] is None:
        pytest.skip("no RSS reader on this platform")
    assert heavy["host_rss_added_mb"] > 80 and light["host_rss_added_mb"] < 40
    assert light["host_rss_peak_mb"] > 80  # the process peak still holds the other backend
    assert heavy["device_added_mb"] is None and heavy["device_peak_mb"] is None  # no GPU in this run


class _FakeCudaAllocator:
    """torch.cuda's memory counters as the bench reads them, for a GPU that is not here."""
    MB = 2**20

    def __init__(self):
        self.allocated = 0
        self.peak = 0
        self.segments = []  # memory_snapshot() entries

    def capture_graph(self, pool_mb: int, static_mb: int):
        # After capture: the pool stays reserved, only the static tensors count as allocated.
        self.segments.append({"device": 0, "segment_pool_id": (1, 0), "total_size": pool_mb * self.MB,
                              "allocated_size": static_mb * self.MB})
        self.allocated += static_mb * self.MB
        self.peak = max(self.peak, self.allocated)

    def install(self, monkeypatch):
        import effiseg.benchmarks.memory as memory

        class Cuda:
            memory_allocated = staticmethod(lambda device=None: self.allocated)
            max_memory_allocated = staticmethod(lambda device=None: self.peak)
            memory_snapshot = staticmethod(lambda: list(self.segments))
            current_device = staticmethod(lambda: 0)

            @staticmethod
            def reset_peak_memory_stats(device=None):
                self.peak = self.allocated

        fake_torch = type("FakeTorch", (), {"cuda": Cuda})
        monkeypatch.setattr(memory, "_torch_cuda", lambda device: fake_torch if str(device).startswith("cuda") else None)


def test_graph_pools_count_what_they_hold_beyond_live_tensors_on_that_device_only(monkeypatch):
    import effiseg.benchmarks.memory as memory
    allocator = _FakeCudaAllocator()
    mb = allocator.MB
    allocator.segments = [
        {"device": 0, "segment_pool_id": (0, 0), "total_size": 900 * mb, "allocated_size": 100 * mb},  # the cache
        {"device": 0, "segment_pool_id": [1, 0], "total_size": 300 * mb, "allocated_size": 20 * mb},  # as a list
        {"device": 0, "segment_pool_id": (2, 0), "total_size": 50 * mb, "allocated_size": 0},
        {"device": 1, "segment_pool_id": (1, 0), "total_size": 700 * mb, "allocated_size": 0},       # another GPU
        {"device": 0, "total_size": 64 * mb, "allocated_size": 0},  # no pool id: the default pool
    ]
    allocator.install(monkeypatch)
    assert memory.torch_cuda_graph_pools_unallocated_mb("cuda:0") == pytest.approx(280 + 50)
    assert memory.torch_cuda_graph_pools_unallocated_mb("cuda:1") == pytest.approx(700)
    assert memory.torch_cuda_graph_pools_unallocated_mb("cpu") is None


@pytest.mark.gpu
def test_a_captured_graph_pool_is_seen_on_a_real_gpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from effiseg.benchmarks.memory import torch_cuda_graph_pools_unallocated_mb
    before = torch_cuda_graph_pools_unallocated_mb("cuda:0")
    x = torch.randn(64, 256, 256, device="cuda:0")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        (x * 2).sum()  # warm-up before capture, as torch's documentation asks
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ((x * 2) + 1).sum()  # 16 MiB intermediates, freed into the graph's pool after capture
    held = torch_cuda_graph_pools_unallocated_mb("cuda:0") - before
    assert held >= 16, held
    del graph, out


def test_a_cuda_graph_configuration_is_charged_for_its_graph_pool(monkeypatch):
    """A captured graph's intermediate tensors leave ``memory_allocated`` when capture ends but stay
    reserved in its private pool: the H200 run showed +63 MB for the fast mode at batch 32."""
    allocator = _FakeCudaAllocator()
    allocator.install(monkeypatch)
    info = ModelInfo(path=None, variant="test", input_height=8, input_width=8)

    class GraphBackend(RecordingBackend):
        captured = False

        def submit(self, slot, n):
            if not self.captured:  # the first (warm-up) batch captures the graph
                allocator.capture_graph(pool_mb=2048, static_mb=10)
                self.captured = True
            super().submit(slot, n)

    pool = BackendPool(lambda target, fmt, batch, size: GraphBackend(info, batch, [], target.name), log=lambda m: None)
    config = Config("model", Target(TARGETS["torch-fast"], "cuda:0"), 1, 8, 8, "uint8-nhwc")
    (result,) = run_rounds([ModelOnly(config, pool)], rounds=1, warmup=1, plan=IterationPlan(iters=1),
                           log=lambda m: None)
    pool.close()
    assert result["error"] is None
    memory = result["memory"]
    assert memory["device_added_mb"] == pytest.approx(2048)  # 10 MB static tensors + 2038 MB free in the pool
    assert memory["device_peak_mb"] == pytest.approx(2048)
    assert "CUDA-graph pools" in memory["device_source"]


def test_every_finished_round_is_handed_out_and_a_deadline_stops_between_rounds():
    info = ModelInfo(path=None, variant="test", input_height=8, input_width=8)
    pool = BackendPool(lambda target, fmt, batch, size: RecordingBackend(info, batch, [], target.name),
                       log=lambda m: None)
    configs = [Config("model", t, 1, 8, 8, "uint8-nhwc") for t in _targets()]
    saved = []
    results = run_rounds([ModelOnly(c, pool) for c in configs], rounds=3, warmup=1, plan=IterationPlan(iters=2),
                         log=lambda m: None, on_round=lambda res, done: saved.append((done, res)))
    assert [done for done, _ in saved] == [1, 2, 3]
    assert all(len(r["samples_ms"]) == 2 for r in saved[0][1])  # round 1's results hold round 1 only
    assert all(len(r["round_mean_ms"]) == 3 for r in results)

    saved.clear()
    messages = []
    results = run_rounds([ModelOnly(c, pool) for c in configs], rounds=3, warmup=1, plan=IterationPlan(iters=2),
                         log=messages.append, deadline=0.0, on_round=lambda res, done: saved.append(done))
    pool.close()
    assert saved == [1]  # the first round always runs; the budget is spent, so no second one starts
    assert all(len(r["samples_ms"]) == 2 and r["error"] is None for r in results)
    assert any("stopping after round 1 of 3" in m for m in messages)


def test_no_configuration_is_opened_after_the_opening_deadline_and_the_opened_ones_still_run():
    info = ModelInfo(path=None, variant="test", input_height=8, input_width=8)
    calls: list[str] = []
    pool = BackendPool(lambda target, fmt, batch, size: RecordingBackend(info, batch, calls, f"{target.name}/b{batch}"),
                       log=lambda m: None)
    configs = [Config("model", t, b, 8, 8, "uint8-nhwc") for b in (1, 2) for t in _targets()]
    messages, saved = [], []
    results = run_rounds([ModelOnly(c, pool) for c in configs], rounds=2, warmup=1, plan=IterationPlan(iters=2),
                         log=messages.append, open_deadline=0.0, on_round=lambda res, done: saved.append(done))
    pool.close()
    first, rest = results[0], results[1:]
    assert first["error"] is None and len(first["samples_ms"]) == 4  # the first is always opened, and runs
    assert set(calls) == {"torch-eager/b1"}  # no other backend was even built
    for r in rest:
        assert r["samples_ms"] == [] and r["latency"] is None
        assert r["error"].startswith("not opened: the time budget ran out")
    assert saved == [1, 2]
    assert sum("skipping" in m for m in messages) == 3


def test_end_to_end_warms_up_in_two_folder_runs_and_logs_where_the_time_went(tmp_path):
    from PIL import Image
    from effiseg.benchmarks.e2e import E2E_WARMUP_RUNS, EndToEnd
    info = ModelInfo(path=None, variant="test", input_height=8, input_width=8)
    calls: list[str] = []
    runner_threads: set[threading.Thread] = set()

    class ThreadNotingBackend(RecordingBackend):
        def submit(self, slot, n):
            runner_threads.add(threading.current_thread())
            super().submit(slot, n)

    pool = BackendPool(lambda target, fmt, batch, size: ThreadNotingBackend(info, batch, calls, "b"), log=lambda m: None)
    images, warm = tmp_path / "images", tmp_path / "warm"
    images.mkdir(), warm.mkdir()
    for i in range(4):
        Image.new("RGB", (12, 10), (i * 40, 90, 30)).save(images / f"{i}.png")
    for i in range(2):
        Image.new("RGB", (12, 10), (i * 40, 90, 30)).save(warm / f"{i}.png")
    m = EndToEnd(Config("e2e", _targets()[0], 2, 8, 8, "uint8-nhwc"), pool, images, warm, tmp_path / "masks",
                 workers=1, writers=1)
    messages = []
    results = run_rounds([m], rounds=1, warmup=10, plan=IterationPlan(iters=1), log=messages.append)
    pool.close()
    assert E2E_WARMUP_RUNS == 2 and len(calls) == 2 + 2  # two warm-up runs of one batch, then 4 images
    assert results[0]["error"] is None and results[0]["warmup_pipeline_timing"]["images"] == 2
    note = [x for x in messages if "pipeline, last warm-up run" in x]
    assert len(note) == 1 and "1 decoder(s), 1 writer(s)" in note[0] and "runner in submit/collect" in note[0]
    # Every run drove the backend from the segmenter's one device thread, which ends with the measurement.
    (runner,) = runner_threads
    assert not runner.is_alive()


def test_a_failing_backend_is_reported_and_the_others_go_on():
    info = ModelInfo(path=None, variant="test", input_height=8, input_width=8)

    def factory(target, fmt, batch, size):
        if target.name == "ort-cpu" and batch == 2:
            raise RuntimeError("cannot build")
        return RecordingBackend(info, batch, [], target.name, fail_after=3 if target.name == "torch-eager" else None)

    pool = BackendPool(factory, log=lambda m: None)
    configs = [Config("model", t, b, 8, 8, "uint8-nhwc") for b in (1, 2) for t in _targets()]
    results = {r["key"]: r for r in run_rounds([ModelOnly(c, pool) for c in configs], rounds=2, warmup=1,
                                               plan=IterationPlan(iters=2), log=lambda m: None)}
    pool.close()
    assert "cannot build" in results[configs[3].key]["error"] and results[configs[3].key]["latency"] is None
    assert "device lost" in results[configs[0].key]["error"]
    assert results[configs[1].key]["error"] is None and len(results[configs[1].key]["samples_ms"]) == 4
