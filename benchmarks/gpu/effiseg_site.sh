# Sourced by the GPU session scripts: effiseg on PYTHONPATH without pip. A namespace folder under
# $WORK/site whose parts are symlinks to the repo's folders (the device has no package registry).
# Needs ROOT (the repo) and WORK set; sets SITE and exports PYTHONPATH.
SITE=$WORK/site
mkdir -p "$SITE/effiseg"
for part in training export runtime benchmarks; do ln -sfn "$ROOT/$part" "$SITE/effiseg/$part"; done
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
