"""The typed model config (effiseg.runtime.model_config): validated when made and when changed,
one JSON form for checkpoints and ONNX metadata, and every older file still read."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from effiseg.runtime.model_config import ModelConfig, ModelConfigError
from effiseg.runtime.model_info import ModelInfo, read_onnx_metadata
from effiseg.runtime.variants import get_variant

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CHECKPOINT = REPO / "training" / "weights" / "default"
BUNDLED_ONNX = REPO / "runtime" / "models" / "effisegnet-default.onnx"

# A checkpoint config as effiseg wrote it before TTA, run-time recommendations and small-region
# removal existed: none of those keys, and training bookkeeping beside the settings.
OLD_CHECKPOINT_CONFIG = {
    "model_type": "effisegnet", "variant": "effisegnet-lite0", "encoder": "tf_efficientnet_lite0",
    "input_size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "decoder_channels": 32,
    "deep_supervision": False, "threshold": 0.5, "effiseg_version": "0.1.0", "best_epoch": 7,
    "val_metrics": {"mean_dice": 0.8},
}


def test_a_new_config_takes_the_variants_settings_and_the_overrides():
    cfg = ModelConfig.for_variant("effisegnet-b0", input_size=416, threshold=0.4)
    v = get_variant("effisegnet-b0")
    assert (cfg.encoder, cfg.mean, cfg.std, cfg.decoder_channels) == (v.encoder, v.mean, v.std, v.decoder_channels)
    assert cfg.input_size == 416 and cfg.threshold == 0.4 and cfg.tta is False and cfg.tta_sizes == ()
    with pytest.raises(KeyError, match="effisegnet-lite2"):  # the known variants are listed
        ModelConfig.for_variant("effisegnet-x9")


@pytest.mark.parametrize("field,value", [
    ("threshold", 1.0), ("threshold", "high"), ("input_size", 16), ("input_size", 64.5),
    ("mean", (0.5, 0.5)), ("std", (0.5, 0.0, 0.5)), ("decoder_channels", 0), ("min_region_px", -1),
    ("tta_sizes", (100,)), ("tta_recommended", {"flips": True, "speed": 2}), ("tta", "yes"), ("variant", ""),
])
def test_an_invalid_value_is_refused_naming_its_field_also_when_changed_with_replace(field, value):
    cfg = ModelConfig.for_variant("effisegnet-lite0")
    with pytest.raises(ModelConfigError, match=field):
        dataclasses.replace(cfg, **{field: value})
    with pytest.raises(ModelConfigError, match=field):
        ModelConfig.from_dict({**cfg.to_dict(), field: value}, source="somewhere/config.json")


def test_the_config_is_frozen_and_its_json_values_are_normalised():
    cfg = ModelConfig.from_dict({"variant": "effisegnet-lite0", "mean": [0.5, 0.5, 0.5], "tta_sizes": [416, 352, 352],
                                 "threshold": "0.45", "input_size": 352.0})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.threshold = 0.6
    assert cfg.mean == (0.5, 0.5, 0.5) and cfg.tta_sizes == (352, 416)
    assert cfg.threshold == 0.45 and isinstance(cfg.input_size, int)


def test_a_dict_round_trip_keeps_everything_including_keys_of_newer_versions():
    newer = {**OLD_CHECKPOINT_CONFIG, "tta": True, "tta_sizes": [64, 96], "calibration": {"temperature": 1.3}}
    cfg = ModelConfig.from_dict(newer)
    assert cfg.extra == {"best_epoch": 7, "val_metrics": {"mean_dice": 0.8}, "calibration": {"temperature": 1.3}}
    written = cfg.to_dict()
    assert written["calibration"] == {"temperature": 1.3} and written["best_epoch"] == 7
    assert ModelConfig.from_dict(json.loads(json.dumps(written))) == cfg
    # The JSON keeps the flat layout older versions read: every setting at the top level.
    assert written["tta_sizes"] == [64, 96] and written["variant"] == "effisegnet-lite0" and "extra" not in written


def test_an_old_checkpoint_config_loads_with_the_missing_settings_at_their_old_meaning():
    cfg = ModelConfig.from_dict(OLD_CHECKPOINT_CONFIG)
    assert cfg.tta is False and cfg.tta_sizes == () and cfg.tta_recommended == {} and cfg.min_region_px == 0
    assert cfg.untrained is False and cfg.input_size == 64 and cfg.effiseg_version == "0.1.0"
    # Even older: only the variant (the rest from the registry, the one place defaults live).
    bare = ModelConfig.from_dict({"variant": "effisegnet-lite2"})
    v = get_variant("effisegnet-lite2")
    assert (bare.encoder, bare.input_size, bare.mean, bare.decoder_channels) == (v.encoder, v.input_size, v.mean,
                                                                                 v.decoder_channels)


def test_what_is_not_a_model_config_is_refused_with_the_file_named():
    with pytest.raises(ModelConfigError, match=r"a/config.json\) has no variant"):
        ModelConfig.from_dict({"input_size": 352}, source="a/config.json")
    with pytest.raises(ModelConfigError, match="model_type"):
        ModelConfig.from_dict({"variant": "effisegnet-lite0", "model_type": "unet"})
    with pytest.raises(ModelConfigError, match="JSON object"):
        ModelConfig.from_dict(["effisegnet-lite0"])
    # A variant of a newer effiseg loads when the file has every setting, and says what is missing if not.
    full = {**ModelConfig.for_variant("effisegnet-lite0").to_dict(), "variant": "effisegnet-v9"}
    assert ModelConfig.from_dict(full).variant == "effisegnet-v9"
    with pytest.raises(ModelConfigError, match="effisegnet-v9.*encoder"):
        ModelConfig.from_dict({"variant": "effisegnet-v9", "input_size": 352})


def test_the_shipped_checkpoint_config_loads_and_round_trips():
    data = json.loads((DEFAULT_CHECKPOINT / "config.json").read_text(encoding="utf-8"))
    cfg = ModelConfig.from_dict(data)
    assert cfg.variant == "effisegnet-lite2" and cfg.threshold == 0.55 and cfg.input_size == 352
    assert cfg.tta_recommended == {"flips": True, "sizes": [352, 416], "threshold": 0.55}
    assert cfg.metrics["test"]["mean_dice"] == data["metrics"]["test"]["mean_dice"]
    written = cfg.to_dict()
    assert {k: v for k, v in written.items() if k in data} == data  # nothing it had is changed or lost


def test_the_bundled_onnx_file_of_the_old_format_gives_the_checkpoints_config():
    """Files exported before the config was stored whole: rebuilt from the individual keys, the
    exporter's facts and the registry, and equal to the checkpoint's in every shared setting."""
    info = ModelInfo.from_onnx(BUNDLED_ONNX)
    assert "effiseg.model_config" not in read_onnx_metadata(BUNDLED_ONNX)
    checkpoint = ModelConfig.from_dict(json.loads((DEFAULT_CHECKPOINT / "config.json").read_text(encoding="utf-8")))
    assert info.config is not None and info.config.encoder == "tf_efficientnet_lite2"
    for name in ("variant", "mean", "std", "threshold", "tta_recommended", "input_size", "decoder_channels"):
        assert getattr(info.config, name) == getattr(checkpoint, name), name
    assert (info.mean, info.threshold, info.hw_multiple, info.dynamic_hw) == ((0.5, 0.5, 0.5), 0.55, 32, True)


def test_new_onnx_metadata_stores_the_whole_config_and_the_infos_own_settings_win():
    cfg = ModelConfig.for_variant("effisegnet-lite0", input_size=64, decoder_channels=16, min_region_px=20,
                                  extra={"best_epoch": 3})
    info = ModelInfo.from_config(cfg, input_format="float32-nchw", output_format="mask", dynamic_hw=True)
    assert info.input_height == 64 and info.mean == cfg.mean and info.output_name == "mask"
    back = ModelInfo.from_metadata(info.to_metadata())
    assert back == info and back.config == cfg  # decoder width and small-region setting survive the file
    flipped = dataclasses.replace(info, tta=True, threshold=0.4)  # a run-time change of the graph's settings
    again = ModelInfo.from_metadata(flipped.to_metadata())
    assert again.config.tta is True and again.config.threshold == 0.4 and again.config.decoder_channels == 16
    # The individual keys are what older readers use: they say the same.
    meta = flipped.to_metadata()
    assert meta["effiseg.tta"] == "1" and meta["effiseg.threshold"] == "0.4"


def test_old_metadata_without_normalisation_takes_the_variants_and_a_fake_variant_must_carry_it():
    meta = ModelInfo(path=None, variant="effisegnet-b0", input_height=352, input_width=352).to_metadata()
    del meta["effiseg.mean"], meta["effiseg.std"]
    info = ModelInfo.from_metadata(meta)
    assert info.mean == get_variant("effisegnet-b0").mean and info.std == get_variant("effisegnet-b0").std
    fake = ModelInfo(path=None, variant="fake", input_height=8, input_width=8).to_metadata()
    assert ModelInfo.from_metadata(fake).config is None  # a test double's file still reads
    del fake["effiseg.mean"]
    with pytest.raises(ValueError, match="mean"):
        ModelInfo.from_metadata(fake, path=Path("fake.onnx"))


def test_a_damaged_stored_config_names_the_file():
    meta = ModelInfo.from_config(ModelConfig.for_variant("effisegnet-lite0")).to_metadata()
    meta["effiseg.model_config"] = json.dumps({**json.loads(meta["effiseg.model_config"]), "input_size": 7})
    with pytest.raises(ValueError, match="m.onnx.*input_size"):
        ModelInfo.from_metadata(meta, path=Path("m.onnx"))


def test_checkpoints_write_the_config_and_old_checkpoints_load(tmp_path):
    pytest.importorskip("torch")
    from effiseg.training.checkpoint import load_config, load_model, model_config, save_checkpoint
    from effiseg.training.model import build_model

    model = build_model("effisegnet-lite0").eval()
    cfg = model_config("effisegnet-lite0", input_size=64, tta=True, best_epoch=4)
    assert cfg.tta is True and cfg.extra == {"best_epoch": 4}
    save_checkpoint(tmp_path / "new", model, cfg)
    loaded_model, loaded = load_model(tmp_path / "new")
    assert loaded == cfg and json.loads((tmp_path / "new" / "config.json").read_text())["best_epoch"] == 4
    # An old checkpoint: its config.json as effiseg wrote it before (no TTA keys), the same weights.
    old = tmp_path / "old"
    old.mkdir()
    (old / "model.safetensors").write_bytes((tmp_path / "new" / "model.safetensors").read_bytes())
    (old / "config.json").write_text(json.dumps(OLD_CHECKPOINT_CONFIG))
    _, old_cfg = load_model(old)
    assert old_cfg.tta is False and old_cfg.extra["best_epoch"] == 7 and load_config(old) == old_cfg
    (old / "config.json").write_text(json.dumps({**OLD_CHECKPOINT_CONFIG, "threshold": 2}))
    with pytest.raises(ValueError, match="threshold.*config.json"):
        load_model(old)


def test_an_old_format_checkpoint_exports_with_its_config_stored_and_the_overrides_applied(
        tiny_checkpoint, verify_images_dir, tmp_path):
    """The export reads an old config.json, applies --threshold/--tta with replace, and the ONNX file
    carries the whole config, which reads back equal; the checkpoint itself is not changed."""
    pytest.importorskip("onnxruntime")
    import shutil

    from effiseg.export.onnx_export import ExportError, export_checkpoint
    old = tmp_path / "old"
    shutil.copytree(tiny_checkpoint, old)
    written = json.loads((old / "config.json").read_text())
    legacy = {k: v for k, v in written.items() if k in OLD_CHECKPOINT_CONFIG and k != "best_epoch"}
    legacy["decoder_channels"] = written["decoder_channels"]
    (old / "config.json").write_text(json.dumps(legacy))
    report = export_checkpoint(old, tmp_path / "m.onnx", threshold=0.45, tta=True, verify_dir=verify_images_dir,
                               verify_count=1, log=lambda *a: None)
    assert report["ok"] and report["threshold"] == 0.45 and report["tta"] is True
    info = ModelInfo.from_onnx(tmp_path / "m.onnx")
    assert info.threshold == 0.45 and info.tta is True and info.config.threshold == 0.45 and info.config.tta is True
    assert info.config == dataclasses.replace(ModelConfig.from_dict(legacy), threshold=0.45, tta=True)
    assert json.loads((old / "config.json").read_text()) == legacy
    with pytest.raises(ExportError, match="threshold"):
        export_checkpoint(old, tmp_path / "bad.onnx", threshold=1.5, verify_dir=verify_images_dir, verify_count=1,
                          log=lambda *a: None)
    assert not (tmp_path / "bad.onnx").exists()
