import pytest
import torch

from effiseg.training.model import EffiSegNet, GhostModule, build_model
from effiseg.training.variants import get_variant, list_variants


@pytest.mark.parametrize("variant,size", [("effisegnet-lite0", (64, 64)), ("effisegnet-lite0", (72, 100)),
                                          ("effisegnet-b0", (96, 96)), ("effisegnet-lite2", (65, 81))])
def test_output_shape_and_gradients(variant, size):
    torch.manual_seed(0)
    model = build_model(variant)
    x = torch.randn(2, 3, *size, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 1, *size)
    out.mean().backward()
    # Gradients reach the input, the first encoder layer and the last decoder layer.
    assert x.grad is not None and x.grad.abs().sum() > 0
    first = next(model.encoder.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0
    assert model.head.weight.grad.abs().sum() > 0
    for branch in model.branches:
        assert branch.conv.weight.grad.abs().sum() > 0


def test_decoder_is_the_papers():
    model = build_model("effisegnet-lite0", ch=32)
    assert len(model.branches) == 5
    for b in model.branches:
        assert b.conv.kernel_size == (3, 3) and b.conv.bias is None and b.conv.out_channels == 32
    assert isinstance(model.ghost1, GhostModule) and isinstance(model.ghost2, GhostModule)
    assert model.head.out_channels == 1 and model.head.kernel_size == (1, 1)


def test_deep_supervision_heads_in_training_only():
    model = build_model("effisegnet-lite0", deep_supervision=True).train()
    out, aux = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1, 64, 64) and len(aux) == 5 and all(a.shape == out.shape for a in aux)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_registry():
    names = list_variants()
    assert {"effisegnet-b0", "effisegnet-b4", "effisegnet-b7", "effisegnet-lite0", "effisegnet-lite4"} <= set(names)
    assert get_variant("effisegnet-lite2").weights_source == "lite-package"
    assert get_variant("effisegnet-b4").mean == (0.485, 0.456, 0.406)
    with pytest.raises(KeyError, match="known variants"):
        get_variant("effisegnet-b9")


def test_ghost_module_channels():
    g = GhostModule(32, 31)
    assert g(torch.randn(1, 32, 8, 8)).shape == (1, 31, 8, 8)
