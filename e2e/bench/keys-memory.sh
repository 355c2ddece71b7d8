#!/usr/bin/env bash
# Idle memory with 10,000 keys (root): two agents, node 1's containerd holding 100 images
# of 98 small layers (10,100 keys), node 2 storing their provider records; resident memory
# of both before and after, in one run (see e2e/src/bin/keys-memory.rs). Writes
# OUT/keys-memory.md (default target/keys-memory).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
bash "$ROOT/e2e/setup.sh" >/dev/null
cargo build --release -q --manifest-path "$ROOT/Cargo.toml" -p mirrorlet --bin mirrorlet -p mirrorlet-e2e --bin keys-memory
MIRRORLET_BIN="$ROOT/target/release/mirrorlet" "$ROOT/target/release/keys-memory" "${OUT:-$ROOT/target/keys-memory}"
