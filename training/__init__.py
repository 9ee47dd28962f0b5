"""effiseg.training: the EffiSegNet model, Kvasir-SEG data, the trainer, evaluation and analysis.

Data flow: image files -> ``data`` (decoded, paired by stem) -> ``augment`` (batched, on the
device) -> ``model`` (EffiSegNet) -> ``losses`` / ``metrics`` -> ``checkpoint`` (safetensors + JSON).
"""
