#!/usr/bin/env bash
# DHT scale probe: N routers in one process, every node announcing at once, then lookups
# (see e2e/src/bin/p2p-scale.rs). Usage: e2e/bench/scale.sh [NODES,...] (default 10,40,60,100)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cargo build --release -q --manifest-path "$ROOT/Cargo.toml" -p mirrorlet-e2e --bin p2p-scale
"$ROOT/target/release/p2p-scale" "${1:-10,40,60,100}" 2> >(grep -v ' INFO \| WARN ' >&2)
