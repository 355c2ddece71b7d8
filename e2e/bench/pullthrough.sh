#!/usr/bin/env bash
# Pull-through benchmark (root): N nodes cold-pull one 200 MiB 4-layer image at once from a
# bandwidth-capped upstream: containerd direct, mirrorlet with pull-through off, mirrorlet
# with pull-through. Usage: e2e/bench/pullthrough.sh [nodes] [upstream rate, tc notation]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
bash "$ROOT/e2e/setup.sh" >/dev/null
cargo build --release -q --manifest-path "$ROOT/Cargo.toml" -p mirrorlet -p mirrorlet-e2e --bins
MIRRORLET_BIN="$ROOT/target/release/mirrorlet" "$ROOT/target/release/pullthrough-bench" "${1:-5}" "${2:-400mbit}"
