# Sourced by the GPU session scripts once OUT, WORK, DEADLINE and SESSION (the name of the log and of
# the pack) are set: the log written to $OUT as it goes, the clock (elapsed; stamp: a line with the
# seconds since the start; left: seconds to DEADLINE), a fresh $WORK/results as RES, and pack, which
# puts RES into $OUT/${SESSION}_results.tgz. Scripts pack after every step: a call cut short by the
# device's limit still returns everything finished before it.
mkdir -p "$OUT" "$WORK"
exec > >(tee "$OUT/${SESSION}_session.log") 2>&1
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
stamp() { echo "[$(elapsed)s] $*"; }
left() { echo $(( DEADLINE - $(elapsed) )); }
RES=$WORK/results
rm -rf "$RES"; mkdir -p "$RES"
pack() {
  tar czf "$OUT/${SESSION}_results.tgz.tmp" -C "$WORK" results \
    && mv "$OUT/${SESSION}_results.tgz.tmp" "$OUT/${SESSION}_results.tgz"
}
