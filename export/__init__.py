"""effiseg.export: training checkpoints -> verified ONNX files with effiseg metadata.

``effiseg.export.onnx_export.export_checkpoint`` does the work, ``effiseg.export.cli`` is
``effiseg-export`` and ``effiseg.export.wrapper.SegmentationGraph`` is the deployed graph
(preprocessing + network + output format). torch is imported by those modules, not by this one.
"""
