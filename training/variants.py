"""The variant registry now lives in the torch-free runtime (``effiseg.runtime.variants``), so the
model config (``effiseg.runtime.model_config``) can fill an old file's missing settings from it
without torch; this module keeps the training side's import path."""
from effiseg.runtime.variants import (HALF_MEAN, HALF_STD, IMAGENET_MEAN, IMAGENET_STD, Variant, get_variant,  # noqa: F401
                                      list_variants, register)
