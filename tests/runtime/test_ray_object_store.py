"""effiseg-run --ray against object stores: S3 (moto's server, as MinIO or any S3-compatible store is
reached) and GCS (gcp-storage-emulator), over HTTP on localhost. The masks are a local run's, byte
for byte; errors are per file; --resume skips complete masks; nothing partial is ever published."""
import os
import socket

import pytest
from conftest import write_noise_images

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pafs = pytest.importorskip("pyarrow.fs")

from test_ray_job import _in_process_ray  # noqa: E402

from effiseg.runtime import ray_job  # noqa: E402
from effiseg.runtime.ray_job import SETTINGS_NAME, run_ray  # noqa: E402
from effiseg.runtime.ray_store import CLOCK_PROBE_NAME, Store, join_location  # noqa: E402
from effiseg.runtime.segmenter import Segmenter  # noqa: E402

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on a free localhost port, reached as a user reaches MinIO: AWS_ENDPOINT_URL and
    keys in the environment (set before Ray starts, so that its workers inherit them)."""
    server_module = pytest.importorskip(
        "moto.server", reason='the S3 tests need moto\'s server: pip install "moto[s3]" flask flask-cors')
    boto3 = pytest.importorskip("boto3")
    port = _free_port()
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="study")
    yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="module")
def gcs_endpoint():
    """gcp-storage-emulator on a free localhost port, bucket "study"."""
    emulator = pytest.importorskip("gcp_storage_emulator.server",
                                   reason="the GCS tests need gcp-storage-emulator: pip install gcp-storage-emulator")
    port = _free_port()
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket="study")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="module")
def ray_beside_stores(request):
    """A local Ray with 2 CPUs, as CI has, started after the S3 settings are in the environment (where
    moto is installed: without it the GCS test still runs)."""
    try:
        request.getfixturevalue("s3_endpoint")
    except pytest.skip.Exception:
        pass
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _upload(folder, store: Store) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            store.put(path.relative_to(folder).as_posix(), path.read_bytes())


def _study(tmp_path):
    """Images at two levels and one corrupt file, the expected masks from a local run, and its summary."""
    src = write_noise_images(tmp_path / "in", 5, shape=(40, 50))
    write_noise_images(src / "sub", 2, shape=(33, 21), ext="jpg", seed=3)
    (src / "sub" / "broken.png").write_bytes(b"not an image")
    return src


def _local_run(tiny_onnx, src, out, **options):
    with Segmenter.from_onnx(tiny_onnx, backend="onnxruntime", max_batch=4, **options) as seg:
        return seg.run_folder(src, out, recursive=True)


def _assert_same_masks(store: Store, local):
    masks = sorted(p.relative_to(local).as_posix() for p in local.rglob("*.png"))
    written = sorted(rel for rel in store.files() if rel.endswith(".png"))
    assert written == masks
    for rel in masks:
        assert store.read(rel) == (local / rel).read_bytes(), rel
    return masks


@pytest.mark.slow
def test_s3_input_and_output_give_a_local_runs_masks_errors_and_resume(tiny_onnx, tmp_path, s3_endpoint,
                                                                       ray_beside_stores):
    src = _study(tmp_path)
    _upload(src, Store("s3://study/frames"))
    expected = _local_run(tiny_onnx, src, tmp_path / "local")
    summary = run_ray("s3://study/frames", "s3://study/masks", model=tiny_onnx, backend="onnxruntime", batch=4,
                      recursive=True)
    out = Store("s3://study/masks")
    masks = _assert_same_masks(out, tmp_path / "local")
    assert len(masks) == 7
    rows = {r["file"]: r for r in summary["files"]}
    assert rows["sub/broken.png"]["status"] == "error" and "not a readable image" in rows["sub/broken.png"]["error"]
    for row in expected["files"]:
        assert rows[row["file"]]["status"] == row["status"]
        assert rows[row["file"]]["area_fraction"] == row["area_fraction"]
    assert summary["summary_json"] == "s3://study/masks/effiseg_summary.json"
    import json
    assert json.loads(out.read("effiseg_summary.json"))["n_failed"] == 1
    # Nothing but the results: no temporary objects, no clock probe, no folder markers.
    assert set(out.files()) == {*masks, SETTINGS_NAME, "effiseg_summary.json", "effiseg_summary.csv"}

    out.delete(masks[0])  # a mask whose PUT a kill stopped: on S3 the object is simply not there
    out.put(masks[1], out.read(masks[1])[:30])  # a mask cut short by some other tool
    again = run_ray("s3://study/frames", "s3://study/masks", model=tiny_onnx, backend="onnxruntime", batch=4,
                    recursive=True, resume=True)
    assert again["n_skipped"] == 5 and again["n_processed"] == 3  # the two masks and the broken image
    assert again["n_ok"] == 2 and again["n_failed"] == 1
    _assert_same_masks(out, tmp_path / "local")


def test_s3_options_in_the_uri_alone_and_resume_right_after_a_fresh_run(tiny_onnx, tmp_path, s3_endpoint,
                                                                       monkeypatch):
    """The store named by the URI (no AWS_ENDPOINT_URL), and a resume straight after a fresh run whose masks
    all fall in the second the settings record was stamped (S3 stamps to the second): all are kept."""
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setattr(ray_job, "import_ray", _in_process_ray)  # Ray Data's calls, in this process
    host = s3_endpoint.split("://")[1]
    frames, masks = (f"s3://study/{name}?endpoint_override={host}&scheme=http" for name in ("uri-frames", "uri-masks"))
    src = write_noise_images(tmp_path / "in", 3, shape=(40, 50))
    _upload(src, Store(frames))
    first = run_ray(frames, masks, model=tiny_onnx, backend="onnxruntime", devices="cpu", batch=2)
    assert first["n_ok"] == 3
    assert first["summary_json"] == f"s3://study/uri-masks/effiseg_summary.json?endpoint_override={host}&scheme=http"
    resumed = run_ray(frames, masks, model=tiny_onnx, backend="onnxruntime", devices="cpu", batch=2, resume=True)
    assert resumed["n_skipped"] == 3 and resumed["n_processed"] == 0
    _local_run(tiny_onnx, src, tmp_path / "local")
    _assert_same_masks(Store(masks), tmp_path / "local")
    assert CLOCK_PROBE_NAME not in Store(masks).files()


@pytest.mark.slow
def test_gcs_input_and_output_give_a_local_runs_masks(tiny_onnx, tmp_path, gcs_endpoint, ray_beside_stores,
                                                      monkeypatch):
    # "anonymous@": no Google credentials (an emulator, or a public bucket); the options reach every actor.
    frames, masks = (f"gs://anonymous@study/{name}?endpoint_override={gcs_endpoint}&scheme=http"
                     for name in ("frames", "masks"))
    src = _study(tmp_path)
    _upload(src, Store(frames))
    _local_run(tiny_onnx, src, tmp_path / "local")
    summary = run_ray(frames, masks, model=tiny_onnx, backend="onnxruntime", batch=4, recursive=True,
                      actors=1)
    assert summary["n_ok"] == 7 and summary["n_failed"] == 1
    _assert_same_masks(Store(masks), tmp_path / "local")
    monkeypatch.setattr(ray_job, "import_ray", _in_process_ray)
    again = run_ray(frames, masks, model=tiny_onnx, backend="onnxruntime", devices="cpu", batch=4, recursive=True,
                    resume=True)
    assert again["n_skipped"] == 7 and again["n_processed"] == 1  # only the broken image again


def test_a_missing_bucket_is_refused_naming_the_location(tiny_onnx, s3_endpoint, monkeypatch):
    monkeypatch.setattr(ray_job, "import_ray", _in_process_ray)
    with pytest.raises(ray_job.RayJobError, match="s3://no-such-bucket/in"):
        run_ray("s3://no-such-bucket/in", "s3://study/x", model=tiny_onnx, backend="onnxruntime")


def test_locations_join_relative_paths_before_the_uri_options():
    assert join_location("s3://b/d?endpoint_override=h:9000&scheme=http", "sub/0.png") == \
        "s3://b/d/sub/0.png?endpoint_override=h:9000&scheme=http"
    assert join_location("gs://anonymous@b/", "0.png") == "gs://anonymous@b/0.png"
    assert join_location("s3://b", "0.png") == "s3://b/0.png"


class _StreamCutOff:
    """An upload whose connection drops half-way through the bytes."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, data):
        self.stream.write(bytes(data[:len(data) // 2]))
        raise OSError("connection reset by peer (simulated)")

    def close(self):
        self.stream.close()


class _FlakyFileSystem:
    def __init__(self, fs):
        self.fs = fs

    def open_output_stream(self, path):
        return _StreamCutOff(self.fs.open_output_stream(path))

    def __getattr__(self, name):
        return getattr(self.fs, name)


def test_an_object_store_write_that_fails_publishes_nothing(s3_endpoint):
    """pyarrow's stream, closed by an exception, would publish what it holds (no abort): put() removes it."""
    store = Store("s3://study/atomic")
    with pytest.raises(TypeError):
        store.put("0.png", None)  # not bytes: refused before a stream opens
    store.put("1.png", b"\x89PNG whole")
    store.fs = _FlakyFileSystem(store.fs)
    with pytest.raises(OSError, match="connection reset"):
        store.put("2.png", b"\x89PNG" + bytes(1000))
    with pytest.raises(OSError, match="connection reset"):
        store.put("1.png", b"\x89PNG replaced")  # a failed overwrite: no partial object under the name
    assert sorted(Store("s3://study/atomic").files()) == []


def test_an_output_inside_the_input_prefix_is_refused(tiny_onnx, s3_endpoint, monkeypatch):
    monkeypatch.setattr(ray_job, "import_ray", _in_process_ray)
    with pytest.raises(ray_job.RayJobError, match="s3://study/frames/masks may not be the input"):
        run_ray("s3://study/frames", "s3://study/frames/masks", model=tiny_onnx, backend="onnxruntime", recursive=True)
    with pytest.raises(ray_job.RayJobError, match="may not be the input"):
        run_ray("s3://study/frames/", "s3://study/frames", model=tiny_onnx, backend="onnxruntime")
