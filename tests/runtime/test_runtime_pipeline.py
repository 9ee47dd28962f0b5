"""The inference pipeline: identical results to direct model calls for any batch/slot/device layout,
bounded memory, per-file failures, and the numerics it relies on."""
from __future__ import annotations

import importlib.util

import threading
import time

import numpy as np
import pytest
from PIL import Image

ort = pytest.importorskip("onnxruntime")

from conftest import fast_precision_of_gpu0  # noqa: E402
from effiseg.runtime import Segmenter  # noqa: E402
from effiseg.runtime.backends import parse_devices  # noqa: E402
from effiseg.runtime.backends.base import Backend  # noqa: E402
from effiseg.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend  # noqa: E402
from effiseg.runtime.model_info import ModelInfo  # noqa: E402
from effiseg.runtime.pipeline import BackendLost, Pipeline  # noqa: E402
from effiseg.runtime.postprocess import count_regions, output_to_mask, resize_bilinear, resize_rgb  # noqa: E402


def _images(kvasir_sample_paths) -> list[np.ndarray]:
    """Eleven images of assorted sizes (real ones where available)."""
    rng = np.random.default_rng(3)
    images = [np.asarray(Image.open(p).convert("RGB")) for p in kvasir_sample_paths[:5]]
    for h, w in [(50, 70), (200, 31), (64, 64), (1, 1), (97, 130), (33, 400)]:
        base = rng.integers(0, 256, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
        images.append(np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR)))
    while len(images) < 11:
        images.append(rng.integers(0, 256, (80, 90, 3), dtype=np.uint8))
    return images


def _direct_masks(onnx_path, images, threshold=0.5) -> list[np.ndarray]:
    """One image at a time straight through ONNX Runtime, same pre/post-processing functions."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    info = ModelInfo.from_onnx(onnx_path)
    out = []
    for im in images:
        x = resize_rgb(im, info.input_height, info.input_width)[None]
        logits = session.run(None, {"images": x})[0][0]
        out.append(output_to_mask(logits, "logits", threshold, *im.shape[:2])[0])
    return out


@pytest.fixture(scope="module")
def images(kvasir_sample_paths):
    return _images(kvasir_sample_paths)


@pytest.fixture(scope="module")
def direct(tiny_onnx, images):
    return _direct_masks(tiny_onnx, images)


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_segment_equals_direct_outputs_for_any_slot_count(tiny_onnx, images, direct, slots):
    with Segmenter.from_onnx(tiny_onnx, backend="onnxruntime", devices="cpu", max_batch=4, slots=slots,
                             workers=3) as seg:
        masks = seg.segment(images)
        assert seg.last_stats.batches == 3  # 11 images in batches of 4: 4 + 4 + 3
    assert len(masks) == len(images)
    for m, ref, im in zip(masks, direct, images):
        assert m.shape == im.shape[:2] and m.dtype == bool
        assert np.array_equal(m, ref)
    assert any(m.any() and not m.all() for m in masks)  # not a degenerate comparison


def test_run_folder_writes_the_same_masks_keyed_by_file(tiny_onnx, images, direct, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(src / f"img{i}.png")
    with Segmenter.from_onnx(tiny_onnx, backend="onnxruntime", max_batch=3, slots=2, workers=4) as seg:
        summary = seg.run_folder(src, tmp_path / "out", regions=True)  # regions: counted only when asked
    assert summary["n_ok"] == len(images) and summary["n_failed"] == 0
    for i, ref in enumerate(direct):
        got = np.asarray(Image.open(tmp_path / "out" / f"img{i}.png"))
        assert got.dtype == np.uint8 and set(np.unique(got)) <= {0, 255}
        assert np.array_equal(got == 255, ref), f"img{i}"
    rows = {r["file"]: r for r in summary["files"]}
    for i, ref in enumerate(direct):
        row = rows[f"img{i}.png"]
        assert row["area_fraction"] == pytest.approx(ref.mean(), abs=1e-6)
        assert row["regions"] == count_regions(ref)
        assert (row["width"], row["height"]) == (images[i].shape[1], images[i].shape[0])
        assert 0.0 <= row["max_probability"] <= 1.0
    timing = summary["timing"]
    for key in ("decode_s", "wait_for_slot_s", "infer_s", "write_s", "runner_idle_s"):
        assert timing[key] >= 0.0
    assert timing["batches"] == 4 and timing["images"] == len(images)


def test_probabilities_are_sigmoid_of_resized_logits(tiny_onnx, images):
    with Segmenter.from_onnx(tiny_onnx, backend="onnxruntime", max_batch=4) as seg:
        probs = seg.segment(images[:4], output="probabilities")
        masks = seg.segment(images[:4])
    for p, m in zip(probs, masks):
        assert p.dtype == np.float32 and 0 <= p.min() and p.max() <= 1
        assert np.array_equal(p > 0.5, m)


def test_threshold_changes_the_cut(tiny_onnx, images):
    with Segmenter.from_onnx(tiny_onnx, max_batch=4, threshold=0.3) as low, \
            Segmenter.from_onnx(tiny_onnx, max_batch=4, threshold=0.7) as high:
        a, b = low.segment(images[:3]), high.segment(images[:3])
    assert all((x >= y).all() for x, y in zip(a, b))
    assert sum(x.sum() for x in a) > sum(y.sum() for y in b)


def test_two_backends_share_one_queue(tiny_onnx, images, direct):
    """devices=[0, 1] opens one backend per device; here two CPU sessions stand in for two GPUs."""
    info = ModelInfo.from_onnx(tiny_onnx)
    backends = [OnnxRuntimeBackend(info, tiny_onnx, "cpu", max_batch=2, n_slots=2) for _ in range(2)]
    used = [0, 0]
    for i, b in enumerate(backends):
        original = b.submit

        def counting(slot, n, _i=i, _original=original):
            used[_i] += 1
            return _original(slot, n)
        b.submit = counting
    with Segmenter(backends, workers=3) as seg:
        masks = seg.segment(images)
    assert all(np.array_equal(m, r) for m, r in zip(masks, direct))
    assert used[0] > 0 and used[1] > 0 and sum(used) == 6


def test_io_binding_path_matches(tiny_onnx, images, direct):
    with Segmenter.from_onnx(tiny_onnx, backend="onnxruntime", max_batch=4, io_binding=True) as seg:
        assert seg.backends[0].io_binding
        masks = seg.segment(images)
    assert all(np.array_equal(m, r) for m, r in zip(masks, direct))


@pytest.mark.parametrize("output_format", ["logits", "probabilities", "mask"])
def test_io_binding_takes_an_output_with_a_channel_axis(tmp_path, output_format):
    """(N,1,H,W) outputs are accepted, so the bound path (the default on GPUs) must bind them so."""
    from tensorrt_test_models import make_tiny_onnx, onnxruntime_reference, random_batch, tiny_info
    info = tiny_info(16, output_format=output_format)
    path = make_tiny_onnx(tmp_path / "nchw-out.onnx", info)
    batch = random_batch(info, 3)
    outputs = []
    for io_binding in (False, True):
        backend = OnnxRuntimeBackend(info, path, max_batch=4, io_binding=io_binding)
        backend.host_input(0)[:3] = batch
        backend.submit(0, 3)
        outputs.append(np.array(backend.collect(0), copy=True))
        backend.close()
    assert outputs[0].shape == outputs[1].shape == (3, 16, 16)
    np.testing.assert_array_equal(outputs[0], outputs[1])
    reference = onnxruntime_reference(path, batch).reshape(3, 16, 16)
    np.testing.assert_allclose(outputs[1], reference.astype(outputs[1].dtype), rtol=1e-6, atol=1e-6)


def test_dynamic_hw_model_at_another_input_size(tiny_onnx_dynamic, tiny_onnx, images):
    with Segmenter.from_onnx(tiny_onnx_dynamic, max_batch=4, input_size=(80, 48)) as seg:
        assert (seg.info.input_height, seg.info.input_width) == (80, 48)
        masks = seg.segment(images[:3])
    assert [m.shape for m in masks] == [im.shape[:2] for im in images[:3]]
    with pytest.raises(ValueError, match="dynamic-hw"):
        Segmenter.from_onnx(tiny_onnx, input_size=80)


def test_torch_backend_matches_onnxruntime_on_cpu(tiny_checkpoint, tiny_onnx, images):
    pytest.importorskip("torch")
    with Segmenter.from_checkpoint(tiny_checkpoint, devices="cpu", precision="fp16", max_batch=3) as seg:
        b = seg.backends[0]
        assert (b.name, b.precision, b.device) == ("torch", "fp32", "cpu")
        assert any("fp16" in m and "CPU" in m for m in b.messages)
        probs_torch = seg.segment(images, output="probabilities")
    with Segmenter.from_onnx(tiny_onnx, backend="onnxruntime", max_batch=3) as seg:
        probs_ort = seg.segment(images, output="probabilities")
    for a, b in zip(probs_torch, probs_ort):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_backend_selection_messages(tiny_onnx):
    with Segmenter.from_onnx(tiny_onnx) as seg:  # auto on a machine without TensorRT or CUDA EP
        expected = "openvino" if importlib.util.find_spec("openvino") else "onnxruntime"
        assert seg.selection_notes[-1] == f"auto: chose {expected} on cpu"
    with Segmenter.from_onnx(tiny_onnx, backend="onnxruntime") as seg:
        provider = seg.backends[0].describe()["provider"]
        assert provider in ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider")
    with pytest.raises(ValueError, match="checkpoints"):
        Segmenter.from_onnx(tiny_onnx, backend="torch")
    assert parse_devices("0,1") == ["cuda:0", "cuda:1"] and parse_devices([1]) == ["cuda:1"]
    assert parse_devices("cpu") == ["cpu"] and parse_devices(None) is None
    with pytest.raises(ValueError):
        parse_devices("cpu,0")


# -- pipeline mechanics with a fake numpy backend -------------------------------------------------
class MeanBackend(Backend):
    """Output = per-pixel channel mean - 128 ("logits"); optionally fails some batches."""
    name = "fake"

    def __init__(self, info, max_batch=4, n_slots=2, fail_on=(), delay=0.0, fail_collect=False):
        super().__init__(info, "cpu", "fp32", max_batch, n_slots)
        self.buffers = [np.zeros((max_batch, info.input_height, info.input_width, 3), np.uint8) for _ in range(n_slots)]
        self.pending = [None] * n_slots
        self.fail_on, self.delay, self.calls = set(fail_on), delay, 0
        self.fail_collect, self.collected = fail_collect, 0  # collected: images handed back

    def host_input(self, slot):
        return self.buffers[slot]

    def submit(self, slot, n):
        self.calls += 1
        if self.calls in self.fail_on:
            raise RuntimeError("device lost")
        time.sleep(self.delay)
        self.pending[slot] = self.buffers[slot][:n].mean(axis=3).astype(np.float32) - 128

    def collect(self, slot):
        out, self.pending[slot] = self.pending[slot], None
        if self.fail_collect:  # how a real GPU usually fails: at the stream sync
            raise RuntimeError("device lost")
        self.collected += len(out)
        return out


def _fake_info(size=16):
    return ModelInfo(path=None, variant="fake", input_height=size, input_width=size)


def test_batch_failure_is_reported_per_file_and_the_run_goes_on():
    backend = MeanBackend(_fake_info(), max_batch=2, n_slots=2, fail_on={2})
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (20, 20, 3), dtype=np.uint8) for _ in range(7)]
    seg = Segmenter([backend], workers=1)
    results = {}
    pipe = seg.pipeline(lambda i: (seg.prepare(images[i]), None),
                        lambda i, meta, out: ("ok", out.shape),
                        lambda i, err, stage: ("error", f"{stage}: {err}"))
    for i, r in pipe.run(range(7)):
        results[i] = r
    assert sorted(results) == list(range(7))
    errors = [r for r in results.values() if r[0] == "error"]
    assert len(errors) == 2 and all("inference: device lost" in r[1] for r in errors)
    assert sum(r[0] == "ok" for r in results.values()) == 5


def test_failures_in_a_row_mean_the_backend_is_lost_and_stop_the_run():
    """Isolated failures stay per-file (above); a backend that fails every batch stops the run
    instead of marking thousands of files failed one batch at a time."""
    backend = MeanBackend(_fake_info(), max_batch=2, n_slots=1, fail_on=set(range(3, 1000)))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (20, 20, 3), dtype=np.uint8) for _ in range(40)]
    seg = Segmenter([backend], workers=1)
    pipe = seg.pipeline(lambda i: (seg.prepare(images[i]), None), lambda i, meta, out: "ok",
                        lambda i, err, stage: "error")
    assert pipe.max_failed_batches == 3
    seen = []
    with pytest.raises(BackendLost, match="failed 3 batches in a row.*device lost"):
        for i, r in pipe.run(range(40)):
            seen.append(r)
    assert seen.count("ok") == 4           # the two batches before the device went
    assert seen.count("error") <= 6        # at most the three failed batches, not the other 30 images
    assert backend.calls < 10
    with pytest.raises(ValueError):
        Pipeline([backend], None, None, None, None, max_failed_batches=0)


def test_memory_is_bounded_by_slots_and_writers():
    """Many images, a slow writer: images decoded but not yet written stay bounded."""
    backend = MeanBackend(_fake_info(), max_batch=4, n_slots=2)
    lock = threading.Lock()
    state = {"open": 0, "peak": 0}

    def load(i):
        with lock:
            state["open"] += 1
            state["peak"] = max(state["peak"], state["open"])
        return np.full((16, 16, 3), i % 256, np.uint8), i

    def finish(i, meta, out):
        time.sleep(0.002)
        with lock:
            state["open"] -= 1
        assert out[0, 0] == (i % 256) - 128  # each output is its own image's, whatever the batch
        return i

    pipe = Pipeline([backend], load, lambda row, rgb: row.__setitem__(Ellipsis, rgb), finish,
                    lambda i, e, stage: pytest.fail(f"{stage}: {e}"), workers=4, writers=2)
    done = sorted(i for _, i in pipe.run(range(300)))
    assert done == list(range(300))
    # slots x batch on the device side + writer queue (2 x writers) + one batch copied out
    # + one image in hand per decoder.
    bound = 2 * 4 + 2 * 2 + 4 + 4 + 2
    assert state["peak"] <= bound, state


def test_fill_and_drain_are_the_spans_before_the_first_submit_and_after_the_last_collect():
    """What a run pays once: decoding its first batch before the device has work, and writing its
    last masks after the device is done."""
    backend = MeanBackend(_fake_info(), max_batch=2, n_slots=2)

    def load(i):
        time.sleep(0.05)  # one decoder: the first batch of 2 is ready after >= 0.1 s
        return np.full((16, 16, 3), i, np.uint8), i

    def finish(i, meta, out):
        if i == 5:
            time.sleep(0.1)  # the last image's mask is slow to write
        return i

    pipe = Pipeline([backend], load, lambda row, rgb: row.__setitem__(Ellipsis, rgb), finish,
                    lambda i, e, stage: pytest.fail(f"{stage}: {e}"), workers=1, writers=1)
    assert sorted(i for _, i in pipe.run(range(6))) == list(range(6))
    stats = pipe.stats
    assert stats.fill_s >= 0.1 and stats.drain_s >= 0.1
    assert stats.fill_s + stats.drain_s <= stats.wall_s
    assert {"fill_s", "drain_s"} <= set(pipe.timing())


def test_early_stop_releases_threads():
    backend = MeanBackend(_fake_info(), max_batch=2, n_slots=2, delay=0.01)
    pipe = Pipeline([backend], lambda i: (np.zeros((16, 16, 3), np.uint8), i),
                    lambda row, rgb: None, lambda i, m, o: i, lambda i, e, s: None, workers=2, writers=1)
    before = threading.active_count()
    gen = pipe.run(range(1000))
    next(gen)
    gen.close()  # the consumer stops: every pipeline thread must end
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= before
    assert all(p is None for p in backend.pending)  # nothing left in flight on the backend


# -- numerics -------------------------------------------------------------------------------------
def _spiral(n: int) -> np.ndarray:
    """A 1-pixel-wide square spiral, arms one pixel apart: a single region whose runs chain
    through the rows back and forth (a long path for the labelling's hooking rounds)."""
    mask = np.zeros((n, n), bool)
    r = c = 0
    mask[0, 0] = True
    lengths = [n - 1, n - 1, n - 1] + [k for m in range(n - 3, 0, -2) for k in (m, m)]
    for i, length in enumerate(lengths):
        dr, dc = ((0, 1), (1, 0), (0, -1), (-1, 0))[i % 4]
        for _ in range(length):
            r, c = r + dr, c + dc
            mask[r, c] = True
    return mask


@pytest.fixture(params=["count_regions", "count_regions_numpy"])
def count_regions_path(request):
    """count_regions and the numpy labelling it runs (its only path: SciPy's was slower, see postprocess)."""
    from effiseg.runtime import postprocess
    return getattr(postprocess, request.param)


def test_count_regions_known_answers(count_regions_path):
    count_regions = count_regions_path
    assert count_regions(np.zeros((5, 5), bool)) == 0
    assert count_regions(np.ones((5, 5), bool)) == 1
    assert count_regions(np.ones((1, 1), bool)) == 1
    diag = np.eye(6, dtype=bool)  # 8-connectivity: one diagonal line is one region
    assert count_regions(diag) == 1 and count_regions(diag[::-1]) == 1
    u = np.zeros((5, 7), bool)
    u[:, 0] = u[:, 6] = u[4, :] = True  # a U shape: two arms that merge at the bottom
    assert count_regions(u) == 1
    comb = np.zeros((9, 21), bool)
    comb[:8, ::2] = True  # eleven teeth...
    assert count_regions(comb) == 11
    comb[8, :] = True     # ...joined by a spine at the bottom: one region
    assert count_regions(comb) == 1
    dots = np.zeros((6, 6), bool)
    dots[::3, ::3] = True  # pixels two apart do not touch
    assert count_regions(dots) == 4
    assert count_regions(np.array([[1, 0, 1]], bool)) == 2 and count_regions(np.array([[1], [0], [1]], bool)) == 2
    with pytest.raises(ValueError, match="2-D"):
        count_regions(np.ones((2, 2, 2), bool))


def test_count_regions_numpy_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    from effiseg.runtime.postprocess import count_regions_numpy
    eight = np.ones((3, 3))
    rng = np.random.default_rng(0)
    masks = [rng.random(shape) < density for density in (0.05, 0.3, 0.5, 0.7)
             for shape in [(1, 1), (1, 30), (30, 1), (40, 53), (120, 90)]]
    # Smooth blobs like a network's masks, at a model's size; spirals and their complements.
    masks += [np.kron(rng.standard_normal((22, 22)), np.ones((16, 16))) > t for t in (-1.0, 0.0, 1.0, 2.0)]
    masks += [_spiral(n) for n in (5, 17, 64)] + [~_spiral(n) for n in (17, 64)]
    for mask in masks:
        assert count_regions_numpy(mask) == ndimage.label(mask, structure=eight)[1], mask.shape


def test_resize_bilinear_is_evaluations_interpolate():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(1)
    for (h, w), (H, W) in [((64, 64), (352, 352)), ((64, 64), (35, 100)), ((8, 5), (1, 1)), ((64, 48), (64, 48))]:
        a = rng.normal(size=(h, w)).astype(np.float32) * 4
        ref = F.interpolate(torch.from_numpy(a)[None, None], size=(H, W), mode="bilinear",
                            align_corners=False)[0, 0].numpy()
        np.testing.assert_allclose(resize_bilinear(a, H, W), ref, atol=1e-4)


# -- GPU (the lead runs these on a CUDA machine) ----------------------------------------------------
@pytest.mark.gpu
def test_torch_fast_mode_matches_fp32_on_cuda(tiny_checkpoint, images):
    with Segmenter.from_checkpoint(tiny_checkpoint, devices=0, precision="fp32", max_batch=4) as seg:
        assert seg.backends[0].precision == "fp32" and not seg.backends[0].cuda_graphs
        ref = seg.segment(images, output="probabilities")
    with Segmenter.from_checkpoint(tiny_checkpoint, devices=0, precision="fp16", max_batch=4, slots=2) as seg:
        b = seg.backends[0]
        assert b.precision == fast_precision_of_gpu0() and b.cuda_graphs and b.folded
        fast = seg.segment(images, output="probabilities")  # 11 images: the last batch is partial
        again = seg.segment(images[:1], output="probabilities")
    for a, r in zip(fast, ref):
        assert np.abs(a - r).max() < 2e-2
    np.testing.assert_allclose(again[0], fast[0], atol=1e-3)  # a padded batch of one: same image, same answer


@pytest.mark.gpu
def test_onnxruntime_cuda_provider_when_installed(tiny_onnx, images, direct):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA provider (pip install \"effiseg[ort-gpu]\")")
    with Segmenter.from_onnx(tiny_onnx, backend="onnxruntime", devices=0, max_batch=4, provider="cuda") as seg:
        b = seg.backends[0]
        assert b.provider == "CUDAExecutionProvider" and b.io_binding
        masks = seg.segment(images)
    for m, r in zip(masks, direct):
        assert (m == r).mean() > 0.999


@pytest.mark.gpu
def test_torch_backend_on_every_gpu(tiny_checkpoint, images):
    import torch
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    with Segmenter.from_checkpoint(tiny_checkpoint, devices=[0, 1], precision="fp32", max_batch=2) as seg:
        assert [b.device for b in seg.backends] == ["cuda:0", "cuda:1"]
        masks = seg.segment(images)
    with Segmenter.from_checkpoint(tiny_checkpoint, devices="cpu", max_batch=2) as seg:
        ref = seg.segment(images)
    for m, r in zip(masks, ref):
        assert (m == r).mean() > 0.999


def test_a_broken_failure_handler_stops_the_run_instead_of_losing_a_job():
    """If reporting a write failure itself fails, run() raises; no job silently disappears."""
    class Boom(RuntimeError):
        pass

    def finish(i, meta, out):
        raise ValueError("disk full")

    def fail(i, err, stage):
        raise Boom(f"cannot report image {i}: {err}")

    backend = MeanBackend(_fake_info(), max_batch=2, n_slots=2)
    images = [np.zeros((20, 20, 3), np.uint8) for _ in range(3)]
    seg = Segmenter([backend], workers=1)
    pipe = seg.pipeline(lambda i: (seg.prepare(images[i]), None), finish, fail)
    with pytest.raises(Boom, match="disk full"):
        list(pipe.run(range(3)))


def test_a_lost_gpu_is_given_up_and_the_others_finish_the_run():
    """Two devices, one of which fails every batch from its third on: it is given up after three
    failures in a row, only the batches it failed fail their images (those waiting on its slots move
    to the other device), and the other device takes all the remaining work; every job gets exactly
    one result."""
    good = MeanBackend(_fake_info(), max_batch=2, n_slots=2, delay=0.002)
    bad = MeanBackend(_fake_info(), max_batch=2, n_slots=2, fail_on=set(range(3, 10_000)))
    good.device, bad.device = "cuda:0", "cuda:1"
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (20, 20, 3), dtype=np.uint8) for _ in range(60)]
    seg = Segmenter([good, bad], workers=2)
    pipe = seg.pipeline(lambda i: (seg.prepare(images[i]), None), lambda i, meta, out: "ok",
                        lambda i, err, stage: f"error: {err}")
    results = {}
    for i, r in pipe.run(range(60)):
        assert i not in results
        results[i] = r
    assert sorted(results) == list(range(60))
    errors = [r for r in results.values() if r != "ok"]
    assert len(errors) == 2 * (bad.calls - 2)  # its failed batches of two images, nothing else
    assert list(pipe.lost) == ["cuda:1"] and "failed 3 batches in a row" in pipe.lost["cuda:1"]
    assert 5 <= bad.calls <= 7  # two good batches, three failures in a row (two successes may reset
    # the count once each), then nothing more went to it: not the 30 batches of the folder
    assert sum(r == "ok" for r in results.values()) == 60 - len(errors)


def test_when_every_device_is_lost_the_run_stops():
    first = MeanBackend(_fake_info(), max_batch=2, n_slots=1, fail_on=set(range(1, 10_000)))
    second = MeanBackend(_fake_info(), max_batch=2, n_slots=1, fail_on=set(range(1, 10_000)))
    first.device, second.device = "cuda:0", "cuda:1"
    images = [np.zeros((20, 20, 3), np.uint8) for _ in range(80)]
    seg = Segmenter([first, second], workers=1)
    pipe = seg.pipeline(lambda i: (seg.prepare(images[i]), None), lambda i, meta, out: "ok",
                        lambda i, err, stage: "error")
    with pytest.raises(BackendLost, match="failed 3 batches in a row"):
        for _ in pipe.run(range(80)):
            pass
    assert len(pipe.lost) == 1  # the first was given up; the second, the last one running, stopped the run


def test_a_folder_run_says_which_device_it_gave_up(tmp_path):
    from conftest import write_noise_images
    good = MeanBackend(_fake_info(), max_batch=2, n_slots=2, delay=0.002)
    bad = MeanBackend(_fake_info(), max_batch=2, n_slots=2, fail_on=set(range(1, 10_000)))
    good.device, bad.device = "cuda:0", "cuda:1"
    src = write_noise_images(tmp_path / "in", 30, shape=(20, 24))
    said = []
    summary = Segmenter([good, bad], workers=2).run_folder(src, tmp_path / "out", log=said.append)
    assert summary["n_ok"] + summary["n_failed"] == 30 and 0 < summary["n_failed"] < 30
    assert list(summary["devices_given_up"]) == ["cuda:1"]
    assert any(line.startswith("gave up on cuda:1 part-way") for line in said)
    failed = [r for r in summary["files"] if r["status"] == "error"]
    assert all("cuda:1" in r["error"] for r in failed)
    assert len(list((tmp_path / "out").glob("*.png"))) == summary["n_ok"]


def _run_with_timeout(pipe, jobs, seconds=20.0):
    """All results of ``pipe.run(jobs)`` from a thread; fails the test rather than hang it."""
    results, errors = {}, []

    def consume():
        try:
            for i, r in pipe.run(jobs):
                assert i not in results
                results[i] = r
        except BaseException as e:
            errors.append(e)
    worker = threading.Thread(target=consume, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "the pipeline hung"
    return results, errors


def test_a_device_lost_in_its_last_collects_does_not_hang_the_run():
    """Found by a stress test: the runner had already taken the end-of-input marker when its last
    collects failed; giving it up then waited for that marker forever."""
    for slots, jobs in ((1, 1), (3, 3), (2, 7)):
        good = MeanBackend(_fake_info(), max_batch=2, n_slots=slots)
        bad = MeanBackend(_fake_info(), max_batch=2, n_slots=slots, fail_collect=True, delay=0.01)
        good.device, bad.device = "cuda:0", "cuda:1"
        pipe = Pipeline([bad, good], lambda i: (np.zeros((16, 16, 3), np.uint8), None),
                        lambda row, rgb: row.__setitem__(Ellipsis, rgb), lambda i, meta, out: "ok",
                        lambda i, err, stage: f"error: {err}", workers=1, max_failed_batches=1)
        results, errors = _run_with_timeout(pipe, range(jobs))
        assert not errors and sorted(results) == list(range(jobs)) and list(pipe.lost) == ["cuda:1"]


def test_a_given_up_device_still_writes_what_it_computed():
    """A batch already on the device when the device is given up (a later submit failed) is written
    if its output comes back; only what the device did not compute fails."""
    good = MeanBackend(_fake_info(), max_batch=1, n_slots=2)
    bad = MeanBackend(_fake_info(), max_batch=1, n_slots=2, fail_on=set(range(2, 10_000)), delay=0.02)
    good.device, bad.device = "cuda:0", "cuda:1"
    pipe = Pipeline([bad, good], lambda i: (np.zeros((16, 16, 3), np.uint8), None),
                    lambda row, rgb: row.__setitem__(Ellipsis, rgb), lambda i, meta, out: "ok",
                    lambda i, err, stage: f"error: {err}", workers=2, max_failed_batches=1)
    results, errors = _run_with_timeout(pipe, range(20))
    assert not errors and sorted(results) == list(range(20))
    oks = sum(r == "ok" for r in results.values())
    assert bad.collected >= 1 and oks == good.collected + bad.collected  # nothing computed was thrown away
    assert any("on cuda:1: RuntimeError: device lost" in r for r in results.values())


def test_batches_waiting_on_a_given_up_device_move_to_the_others_with_their_pixels():
    """Decoded batches waiting on the lost device's slots are copied into the other devices' free
    slots and computed there: their results are those of their own images (rows not mixed up), and
    only the batch the device failed fails. Several slot counts, batch sizes and worker counts."""
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (20, 20, 3), dtype=np.uint8) for _ in range(40)]
    for slots, batch, workers, n_good in ((3, 2, 2, 1), (2, 3, 3, 2), (4, 1, 2, 1), (2, 4, 1, 2)):
        goods = [MeanBackend(_fake_info(), max_batch=batch, n_slots=slots, delay=0.003) for _ in range(n_good)]
        # Slow to fail, so that its other slots fill up and wait while it fails its first batch.
        bad = MeanBackend(_fake_info(), max_batch=batch, n_slots=slots, fail_on=set(range(1, 10_000)), delay=0.05)
        bad.submit = (lambda original: (lambda slot, n: (time.sleep(0.05), original(slot, n))[1]))(bad.submit)
        for k, g in enumerate(goods):
            g.device = f"cuda:{k}"
        bad.device = f"cuda:{n_good}"
        seg = Segmenter([bad, *goods], workers=workers)
        expected = {i: float(seg.prepare(images[i]).mean(axis=2).astype(np.float32).mean() - 128) for i in range(40)}
        pipe = Pipeline([bad, *goods], lambda i: (seg.prepare(images[i]), None),
                        lambda row, rgb: row.__setitem__(Ellipsis, rgb),
                        lambda i, meta, out: float(out.mean()), lambda i, err, stage: f"error: {err}",
                        workers=workers, max_failed_batches=1)
        results, errors = _run_with_timeout(pipe, range(40))
        assert not errors and sorted(results) == list(range(40))
        failed = [i for i, r in results.items() if isinstance(r, str)]
        assert len(failed) <= batch, (slots, batch, workers, failed)  # the one batch it failed
        for i, r in results.items():
            if not isinstance(r, str):
                assert abs(r - expected[i]) < 1e-4, (slots, batch, workers, i)
        assert list(pipe.lost) == [bad.device]


class _ValueBackend(Backend):
    """Output = each row's first pixel value; ``on_submit(values)`` may sleep or raise."""
    name = "fake"

    def __init__(self, device, max_batch, n_slots, on_submit=None, dtype=np.uint8):
        super().__init__(_fake_info(4), device, "fp32", max_batch, n_slots)
        self.buffers = [np.zeros((max_batch, 4, 4, 3), dtype) for _ in range(n_slots)]
        self.pending = [None] * n_slots
        self.on_submit, self.submitted = on_submit, []

    def host_input(self, slot):
        return self.buffers[slot]

    def submit(self, slot, n):
        values = [int(v) for v in self.buffers[slot][:n, 0, 0, 0]]
        self.submitted.append(values)
        if self.on_submit:
            self.on_submit(values)
        self.pending[slot] = np.ones((n, 4, 4), np.float32) * np.array(values, np.float32)[:, None, None]

    def collect(self, slot):
        out, self.pending[slot] = self.pending[slot], None
        return out


def _value_pipeline(backends, jobs):
    pipe = Pipeline(backends, lambda i: (i, None), lambda row, v: row.__setitem__(Ellipsis, v),
                    lambda i, meta, out: float(out[0, 0]), lambda i, err, stage: f"error: {err}",
                    workers=1, writers=1, max_failed_batches=1)
    results, errors = _run_with_timeout(pipe, range(jobs))
    assert not errors and sorted(results) == list(range(jobs))
    return pipe, results


def test_a_waiting_batch_is_split_over_gpus_with_smaller_batches():
    """GPUs may take different batch sizes (a TensorRT profile or fixed batch lowers max_batch): a
    waiting batch of 4 moves as 2 + 2 rather than failing at the first slot too small for it."""
    def gone(values):
        time.sleep(0.2)
        raise RuntimeError("device lost")
    lost = _ValueBackend("cuda:0", 4, 2, on_submit=gone)
    small, large = _ValueBackend("cuda:1", 2, 1), _ValueBackend("cuda:2", 4, 1)
    pipe, results = _value_pipeline([lost, small, large], 8)
    failed = sorted(i for i, r in results.items() if isinstance(r, str))
    assert failed == [0, 1, 2, 3]  # the batch it failed; the waiting batch 4..7 was moved
    assert all(results[i] == float(i) for i in range(4, 8))
    assert all(len(values) <= 2 for values in small.submitted)


def test_a_batch_moved_at_the_end_moves_on_when_its_new_gpu_fails_too():
    """Three GPUs: cuda:0 fails after every runner read its end marker and moves its waiting batches
    to cuda:1, which then fails too: they move on to cuda:2, which must not have stopped meanwhile."""
    def first_gone(values):
        time.sleep(0.3)
        raise RuntimeError("device 0 lost")

    def second_gone(values):
        time.sleep(0.6)
        raise RuntimeError("device 1 lost")
    backends = [_ValueBackend("cuda:0", 1, 3, on_submit=first_gone),
                _ValueBackend("cuda:1", 1, 2, on_submit=second_gone), _ValueBackend("cuda:2", 1, 1)]
    pipe, results = _value_pipeline(backends, 3)
    assert sorted(pipe.lost) == ["cuda:0", "cuda:1"]
    failed = [i for i, r in results.items() if isinstance(r, str)]
    assert len(failed) == 2 and all(results[i] == float(i) for i in set(range(3)) - set(failed))
    assert backends[2].submitted  # the healthy GPU computed what the two lost ones could not


def test_waiting_rows_go_only_where_their_layout_fits():
    """A backend whose host buffers take another layout (here float32) cannot take the rows: they go
    to one that can, and fail (no hang, no spin on its free slots) where none can."""
    def gone(values):
        time.sleep(0.2)
        raise RuntimeError("device lost")
    for with_a_fitting_gpu in (True, False):
        others = [_ValueBackend("cuda:1", 2, 2, dtype=np.float32)]
        if with_a_fitting_gpu:
            others.append(_ValueBackend("cuda:2", 2, 1))
        lost = _ValueBackend("cuda:0", 2, 3, on_submit=gone)
        pipe, results = _value_pipeline([lost, *others], 6)
        failed = sorted(i for i, r in results.items() if isinstance(r, str))
        moved = [v for values in others[-1].submitted for v in values] if with_a_fitting_gpu else []
        assert set(failed).isdisjoint(moved) and all(results[i] == float(i) for i in moved)
        if with_a_fitting_gpu:
            assert len(failed) == 2  # only the batch it failed


def test_closing_a_segmenter_closes_every_backend_even_when_one_fails_to_close():
    closed = []

    class ClosingBackend(MeanBackend):
        def __init__(self, tag, fail):
            super().__init__(_fake_info())
            self.tag, self.fail = tag, fail

        def close(self):
            closed.append(self.tag)
            if self.fail:
                raise RuntimeError("device lost while freeing")

    seg = Segmenter([ClosingBackend("gpu0", True), ClosingBackend("gpu1", False)])
    with pytest.raises(RuntimeError, match="freeing"):
        seg.close()
    assert closed == ["gpu0", "gpu1"]


def test_an_error_without_a_message_is_named_in_the_summary(tmp_path):
    """MemoryError() has no text: the summary still says what failed."""
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(src / "a.png")

    class OutOfMemory(MeanBackend):
        def submit(self, slot, n):
            raise MemoryError()

    with Segmenter([OutOfMemory(_fake_info())]) as seg:
        summary = seg.run_folder(src, tmp_path / "out", progress=False)
    (row,) = summary["files"]
    assert row["status"] == "error" and row["error"] == "inference: MemoryError"
