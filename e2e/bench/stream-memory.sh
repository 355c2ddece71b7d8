#!/usr/bin/env bash
# Stream memory (root): one agent's resident memory under 16 full-speed readers and 64
# stalled clients of a local 256 MiB layer, with the default --stream-memory and with the
# bound out of the way, in one run (see e2e/src/bin/stream-memory.rs). Writes
# OUT/stream-memory.md (default target/stream-memory).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
bash "$ROOT/e2e/setup.sh" >/dev/null
cargo build --release -q --manifest-path "$ROOT/Cargo.toml" -p mirrorlet --bin mirrorlet -p mirrorlet-e2e --bin stream-memory
MIRRORLET_BIN="$ROOT/target/release/mirrorlet" "$ROOT/target/release/stream-memory" "${OUT:-$ROOT/target/stream-memory}"
