#!/usr/bin/env bash
# Scale harness: N agents (router, registry, in-memory store) in worker processes, every
# node announcing at once, lookups, one new blob asked for by every node, 10% killed
# (see e2e/src/bin/p2p-scale.rs; 10,100,250,1000 takes about 36 minutes on 2 cores). Writes the table and the plot to OUT (default
# target/bench-scale), the plot also as a PNG (headless Chromium) for BENCHMARKS.md.
# Usage: e2e/bench/scale.sh [NODES,...] (default 10,100,250,1000)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-$ROOT/target/bench-scale}
cargo build --release -q --manifest-path "$ROOT/Cargo.toml" -p mirrorlet-e2e --bin p2p-scale
"$ROOT/target/release/p2p-scale" "${1:-10,100,250,1000}" "$OUT" 2> >(grep -v ' INFO \| WARN ' >&2)
timeout 60 chromium --headless --no-sandbox --disable-gpu --hide-scrollbars \
  --user-data-dir="$OUT/chromium" --window-size=1000,420 \
  --screenshot="$OUT/scale.png" "file://$OUT/scale.svg" >/dev/null 2>&1
echo "plot: $OUT/scale.png (BENCHMARKS.md shows docs/images/scale-probe.png)"
