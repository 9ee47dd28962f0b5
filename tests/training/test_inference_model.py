"""The network rewritten for inference (training/inference_model.py) computes what the trained
network computes, at every input size, and refuses to pass off a wrong rewrite."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

import numpy as np  # noqa: E402
from torch import nn  # noqa: E402

from effiseg.training import inference_model  # noqa: E402
from effiseg.training.inference_model import (FoldedEffiSegNet, FoldError, fold_for_inference,  # noqa: E402
                                              sizes_chain)
from effiseg.training.model import build_model  # noqa: E402


def _model_with_batchnorm_statistics(seed: int = 0, variant: str = "effisegnet-lite0", **kwargs) -> nn.Module:
    """An untrained Lite0 EffiSegNet whose every BatchNorm has non-trivial statistics and affine
    parameters: with the defaults (mean 0, var 1, weight 1, bias 0) a fold could be wrong unseen."""
    torch.manual_seed(seed)
    model = build_model(variant, **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                shape = m.running_mean.shape
                m.running_mean.copy_(torch.randn(shape, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(shape, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(shape, generator=gen) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return _model_with_batchnorm_statistics()


@pytest.mark.parametrize("size", [(64, 64), (96, 64), (70, 45)])
def test_folded_model_matches_the_original(model, size):
    # 64 and 96 x 64 take the half-resolution sum; 70 x 45 (not multiples of 32) the direct one.
    folded = fold_for_inference(model, probe_size=64)
    x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = model(x), folded(x)
    assert got.shape == want.shape == (3, 1, *size)
    assert float((want - got).abs().max()) <= 1e-4 * max(1.0, float(want.abs().max()))


def test_the_papers_encoders_fold_too():
    # efficientnet_b* (the paper's B4/B5 family): plain padded convolutions and squeeze-excitation
    # blocks, where the tf_efficientnet_lite* encoders have "same" padding and none.
    net = _model_with_batchnorm_statistics(seed=4, variant="effisegnet-b0")
    folded = fold_for_inference(net, probe_size=64)
    assert folded.encoder_folds > 0 and not any(isinstance(m, nn.BatchNorm2d) for m in folded.encoder.modules())
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        assert torch.allclose(net(x), folded(x), atol=1e-4, rtol=0)


def test_direct_merge_matches_too(model):
    folded = fold_for_inference(model, probe_size=64)
    folded.merge = "direct"
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert torch.allclose(model(x), folded(x), atol=1e-4, rtol=0)


def test_half_resolution_sum_runs_only_where_sizes_chain(model, monkeypatch):
    folded = fold_for_inference(model, probe_size=64)
    calls = []
    real = inference_model.F.interpolate

    def spy(x, size=None, **kwargs):
        calls.append((tuple(x.shape[-2:]), tuple(size)))
        return real(x, size=size, **kwargs)

    monkeypatch.setattr(inference_model.F, "interpolate", spy)
    with torch.no_grad():
        folded(torch.randn(1, 3, 64, 64))
    # Four 2x steps between the five maps, then one to full size on the 16-channel primary.
    assert calls == [((2, 2), (4, 4)), ((4, 4), (8, 8)), ((8, 8), (16, 16)), ((16, 16), (32, 32)),
                     ((32, 32), (64, 64))]
    calls.clear()
    with torch.no_grad():
        folded(torch.randn(1, 3, 70, 45))
    assert len(calls) == 5 and all(size == (70, 45) for _, size in calls)


def test_sizes_chain():
    assert sizes_chain([(176, 176), (88, 88), (44, 44), (22, 22), (11, 11)], 352, 352)
    assert sizes_chain([(208, 176), (104, 88), (52, 44), (26, 22), (13, 11)], 416, 352)
    assert not sizes_chain([(185, 185), (93, 93), (47, 47), (24, 24), (12, 12)], 369, 369)
    assert not sizes_chain([(88, 88), (44, 44)], 352, 352)  # the first map is not at stride 2


def test_every_encoder_batchnorm_is_folded_and_the_original_is_untouched(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_for_inference(model, probe_size=64)
    assert folded.encoder_folds > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.encoder.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.encoder.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_deep_supervision_model_folds_to_the_plain_output():
    net = _model_with_batchnorm_statistics(seed=3, deep_supervision=True)
    folded = fold_for_inference(net, probe_size=64)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net(x), folded(x), atol=1e-4, rtol=0)


def test_a_wrong_fold_is_refused(model, monkeypatch):
    real = inference_model.fold_conv_batchnorm

    def corrupting(module):
        n = real(module)
        with torch.no_grad():
            module.conv_stem.bias.add_(0.5)  # what a mis-paired conv/BatchNorm would look like
        return n

    monkeypatch.setattr(inference_model, "fold_conv_batchnorm", corrupting)
    with pytest.raises(FoldError, match="differs from the original"):
        fold_for_inference(model, probe_size=64)


def test_folded_model_has_no_training_mode(model):
    folded = fold_for_inference(model, probe_size=64)
    assert isinstance(folded, FoldedEffiSegNet)
    with pytest.raises(FoldError, match="inference only"):
        folded.train()
    folded.eval()  # still allowed


def test_other_modules_pass_through():
    plain = nn.Conv2d(3, 1, 1)
    assert fold_for_inference(plain) is plain


def test_folded_model_runs_in_half_precision_and_channels_last(model):
    folded = fold_for_inference(model, probe_size=64).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = model(x)
        got = folded.to(torch.bfloat16)(x.to(torch.bfloat16)).float()  # CPU half: bfloat16 is what runs
    assert got.shape == want.shape
    assert float((want - got).abs().max()) < 0.1 * max(1.0, float(want.abs().max()))


def test_torch_backend_folds_only_its_fast_mode_and_says_when_it_cannot(tiny_checkpoint, monkeypatch):
    from effiseg.runtime.backends.torch_backend import TorchBackend

    backend = TorchBackend(tiny_checkpoint, device="cpu", precision="fp32", max_batch=1, n_slots=1)
    # fp32 is the benchmark's baseline: the network as trained.
    assert not backend.folded and not isinstance(backend.graph.model, FoldedEffiSegNet)
    assert "the network as trained" in backend.messages[-1]
    # auto is the fast mode: on the CPU, the rewritten network in fp32, no CUDA graphs.
    fast = TorchBackend(tiny_checkpoint, device="cpu", precision="auto", max_batch=1, n_slots=1)
    assert fast.folded and isinstance(fast.graph.model, FoldedEffiSegNet)
    assert (fast.precision, fast.cuda_graphs) == ("fp32", False) and "rewritten" in fast.messages[-1]
    x = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    outs = []
    for b in (backend, fast):
        b.host_input(0)[:1] = x
        b.submit(0, 1)
        outs.append(b.collect(0).copy())
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-4)
    trained = backend.graph.model
    assert isinstance(backend._fold(trained, (64, 64)), FoldedEffiSegNet) and backend.folded

    def refuse(*args, **kwargs):
        raise FoldError("the folded model differs from the original by 1 (logit scale 5) at 64x64")

    monkeypatch.setattr(inference_model, "fold_for_inference", refuse)
    backend.folded = False
    assert backend._fold(trained, (64, 64)) is trained and not backend.folded
    assert "runs the network unfolded" in backend.messages[-1] and "differs" in backend.messages[-1]


def test_folded_model_keeps_the_networks_dtype(model):
    # The op profile folds a network already moved to its device and precision: every layer of
    # the folded copy must follow it (a float64 network stands in for a CUDA one here).
    net = _model_with_batchnorm_statistics(seed=5).double()
    folded = fold_for_inference(net, probe_size=64)
    assert {p.dtype for p in folded.parameters()} == {torch.float64}
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(net(x), folded(x), atol=1e-8, rtol=0)
