#!/usr/bin/env bash
# Peer-to-peer benchmark (root): 1 GiB pull through two agents vs a plain TCP copy between
# the same namespaces, CRI pulls from peers vs from the registry, DHT lookup latency, and a
# blob from unevenly capped holders with and without parts (see e2e/src/bin/p2p-bench.rs).
# Usage: e2e/bench/p2p.sh [runs]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
bash "$ROOT/e2e/setup.sh" >/dev/null
cargo build --release -q --manifest-path "$ROOT/Cargo.toml" -p mirrorlet --bin mirrorlet -p mirrorlet-e2e --bin p2p-bench
MIRRORLET_BIN="$ROOT/target/release/mirrorlet" "$ROOT/target/release/p2p-bench" "${1:-3}"
