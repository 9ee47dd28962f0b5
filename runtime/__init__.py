"""effiseg.runtime: inference over folders of images, importable without torch or timm."""
