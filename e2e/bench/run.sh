#!/usr/bin/env bash
# All end-to-end benchmarks (`make bench`). Results go in BENCHMARKS.md by hand, with the
# command that produced them.
set -euo pipefail
cd "$(dirname "$0")"
./blob-throughput.sh "${BLOB_MIB:-1024}" "${RUNS:-5}"
./p2p.sh "${RUNS:-3}"
./pullthrough.sh "${NODES:-5}" "${UPSTREAM_RATE:-400mbit}"
./stream-memory.sh
./keys-memory.sh
