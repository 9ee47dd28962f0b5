"""effiseg.training.analysis: where EffiSegNet answers wrong, and why; statistics for claiming a gain.

Modules (numpy/scipy unless noted; nothing heavy is imported here):

* ``attributes``  per-image attributes (polyp size and count, polyp-level detection, boundary vs far
  errors, border contact, the scope overlay box, highlights, luminance, blur);
* ``analyze``     ``analyze_predictions(samples, probabilities, threshold)`` -> ``AnalysisResult``,
  CSV/JSON writers, probability files; ``analyze_checkpoint`` runs a model first (torch);
* ``report``      Markdown + PNG figures (matplotlib);
* ``postprocess`` candidate fixes: small-region removal, hole filling, threshold choice;
* ``stats``       paired (and seed-aware) bootstrap intervals, mean ± sd, percentiles;
* ``cli``         the ``effiseg-analyze`` command.
"""
