#!/usr/bin/env bash
# Soak (root): one agent on the namespace cluster under mixed traffic (well-behaved, slow,
# stalled and broken clients) for SECONDS (default 600), its RSS and open descriptors
# sampled every 15 s (see e2e/src/bin/soak.rs). Writes OUT/soak.md (default target/soak).
# Usage: e2e/bench/soak.sh [SECONDS]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
bash "$ROOT/e2e/setup.sh" >/dev/null
cargo build --release -q --manifest-path "$ROOT/Cargo.toml" -p mirrorlet -p mirrorlet-e2e --bins
MIRRORLET_BIN="$ROOT/target/release/mirrorlet" "$ROOT/target/release/soak" "${1:-600}" "${OUT:-$ROOT/target/soak}"
