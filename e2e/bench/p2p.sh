#!/usr/bin/env bash
# Peer-to-peer benchmark (root): 1 GiB pull through two agents vs a plain TCP copy between
# the same namespaces, and DHT lookup latency. Usage: e2e/bench/p2p.sh [runs]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
bash "$ROOT/e2e/setup.sh" >/dev/null
cargo build --release -q --manifest-path "$ROOT/Cargo.toml" -p mirrorlet -p mirrorlet-e2e --bins
MIRRORLET_BIN="$ROOT/target/release/mirrorlet" "$ROOT/target/release/p2p-bench" "${1:-3}"
