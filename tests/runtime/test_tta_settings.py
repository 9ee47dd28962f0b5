"""Multi-scale TTA settings: parsing, validation and the work they stand for (no torch needed)."""
import pytest

from effiseg.runtime.model_info import ModelInfo, describe_tta, network_passes, parse_tta_sizes


def test_sizes_parse_from_text_lists_and_nothing():
    assert parse_tta_sizes("416, 352,416") == (352, 416)   # sorted, repeats dropped
    assert parse_tta_sizes([352, 416.0]) == (352, 416)
    for nothing in (None, "", "none", "OFF", []):
        assert parse_tta_sizes(nothing) == ()


@pytest.mark.parametrize("bad, reason", [("350", "multiple of 32"), ("32", "between 64 and 2048"),
                                         ("4096", "between 64 and 2048"), ("352,x", "'x' is not a whole number"),
                                         ([352.5], "not a whole number")])
def test_bad_sizes_are_refused_with_the_reason(bad, reason):
    with pytest.raises(ValueError, match=reason):
        parse_tta_sizes(bad)


def test_passes_per_image_and_their_description():
    assert network_passes(False) == 1 and network_passes(True) == 4
    assert network_passes(True, (352, 416)) == 8 and network_passes(False, (352, 416)) == 2
    assert describe_tta(False) == "no TTA (1 network pass per image)"
    assert describe_tta(True, (352, 416)) == "flip TTA at sizes 352+416 (8 network passes per image)"


def test_sizes_survive_the_metadata_round_trip_and_old_files_have_none():
    info = ModelInfo(path=None, variant="effisegnet-lite2", input_height=352, input_width=352, tta=True,
                     tta_sizes=(352, 416))
    meta = info.to_metadata()
    assert ModelInfo.from_metadata(meta).tta_sizes == (352, 416)
    del meta["effiseg.tta_sizes"]  # a file exported before multi-scale TTA existed
    assert ModelInfo.from_metadata(meta).tta_sizes == ()
    config = {"variant": "effisegnet-lite2", "input_size": 352, "tta": True, "tta_sizes": [416, 352]}
    assert ModelInfo.from_checkpoint_config(config).tta_sizes == (352, 416)


def test_multiscale_settings_refuse_another_input_size():
    config = {"variant": "effisegnet-lite2", "input_size": 352, "tta": True, "tta_sizes": [352, 416]}
    assert ModelInfo.from_checkpoint_config(config, input_size=352).input_height == 352
    for other in (512, (352, 416)):
        with pytest.raises(ValueError, match="chosen for the model's input size 352x352"):
            ModelInfo.from_checkpoint_config(config, input_size=other)
    plain = dict(config, tta_sizes=[])
    assert ModelInfo.from_checkpoint_config(plain, input_size=512).input_height == 512  # no sizes: any size
    assert parse_tta_sizes(416) == (416,)  # a single number in a hand-edited config
