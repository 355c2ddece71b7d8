#!/usr/bin/env bash
# Blob-serving throughput on loopback, warm page cache, for one blob (default 1 GiB):
#   cat of the blob file | mirrorlet from the content file | mirrorlet over containerd gRPC
#   | docker-registry (Distribution 2.8) serving the same blob.
# Usage: e2e/bench/blob-throughput.sh [size-MiB] [runs]   (root; builds the release binary)
set -euo pipefail
SIZE_MIB=${1:-1024}
RUNS=${2:-5}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$(mktemp -d /tmp/mirrorlet-bench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

bash "$ROOT/e2e/setup.sh" >/dev/null
cargo build --release -q --manifest-path "$ROOT/Cargo.toml" -p mirrorlet
BIN="$ROOT/target/release/mirrorlet"

# A private containerd (no CRI) holding the blob.
cat >"$WORK/containerd.toml" <<TOML
version = 2
root = "$WORK/root"
state = "$WORK/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$WORK/containerd.sock"
TOML
containerd --config "$WORK/containerd.toml" >"$WORK/containerd.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do [ -S "$WORK/containerd.sock" ] && break; sleep 0.1; done
head -c $((SIZE_MIB * 1024 * 1024)) /dev/urandom >"$WORK/blob"
DIGEST="sha256:$(sha256sum "$WORK/blob" | cut -d' ' -f1)"
ctr --address "$WORK/containerd.sock" -n k8s.io content ingest \
  --expected-digest "$DIGEST" --expected-size $((SIZE_MIB * 1024 * 1024)) bench-ref <"$WORK/blob"
ctr --address "$WORK/containerd.sock" -n k8s.io content label "$DIGEST" containerd.io/gc.root=bench >/dev/null
FILE="$WORK/root/io.containerd.content.v1.content/blobs/sha256/${DIGEST#sha256:}"

"$BIN" run --listen 127.0.0.1:15001 --metrics-listen 127.0.0.1:15011 --p2p false --containerd-socket "$WORK/containerd.sock" \
  --containerd-content-dir "$WORK/root/io.containerd.content.v1.content" --log-level warn >"$WORK/agent-file.log" 2>&1 &
PIDS+=($!)
"$BIN" run --listen 127.0.0.1:15002 --metrics-listen 127.0.0.1:15012 --p2p false --containerd-socket "$WORK/containerd.sock" \
  --containerd-content-dir "" --log-level warn >"$WORK/agent-grpc.log" 2>&1 &
PIDS+=($!)

# docker-registry with the same blob uploaded through its API.
cat >"$WORK/registry.yml" <<YML
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $WORK/registry}}
http: {addr: 127.0.0.1:15003}
YML
docker-registry serve "$WORK/registry.yml" >"$WORK/registry.log" 2>&1 &
PIDS+=($!)
for port in 15001 15002 15003; do
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done
done
LOC=$(curl -fsi -X POST http://127.0.0.1:15003/v2/bench/blob/blobs/uploads/ | tr -d '\r' | awk -F': ' 'tolower($1)=="location"{print $2}')
case "$LOC" in http*) ;; *) LOC="http://127.0.0.1:15003$LOC" ;; esac
curl -fs -X PUT -H 'Content-Type: application/octet-stream' -T "$WORK/blob" "$LOC&digest=$DIGEST" >/dev/null

cat "$FILE" >/dev/null # warm the page cache
gbps() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.2f", b / s / 1e9 }'; }
measure() { # name, command producing "<bytes> <seconds>" per run
  local name=$1; shift
  local best=0 all=()
  for _ in $(seq "$RUNS"); do
    local r; r=$("$@")
    all+=("$r")
    best=$(awk -v a="$best" -v b="$r" 'BEGIN { print (b > a) ? b : a }')
  done
  local median; median=$(printf '%s\n' "${all[@]}" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  printf '%-44s median %6s GB/s   best %6s GB/s\n' "$name" "$median" "$best"
}
run_cat() {
  local t0 t1; t0=$(date +%s.%N); cat "$FILE" >/dev/null; t1=$(date +%s.%N)
  gbps $((SIZE_MIB * 1024 * 1024)) "$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')"
}
run_curl() {
  curl -fs -o /dev/null -w '%{size_download} %{time_total}\n' "$1" | awk '{ printf "%.2f", $1 / $2 / 1e9 }'
}

echo "blob: ${SIZE_MIB} MiB, ${RUNS} runs each, loopback, warm page cache ($(nproc) cores)"
measure "cat of the content file" run_cat
measure "mirrorlet, content file (fast path)" run_curl "http://127.0.0.1:15001/v2/bench/blob/blobs/$DIGEST?ns=example.com"
measure "mirrorlet, containerd gRPC (fallback)" run_curl "http://127.0.0.1:15002/v2/bench/blob/blobs/$DIGEST?ns=example.com"
measure "docker-registry 2.8 (Distribution)" run_curl "http://127.0.0.1:15003/v2/bench/blob/blobs/$DIGEST"

# Manifests: one small OCI manifest, by digest, from the agent (read from containerd once,
# then kept in memory) and from docker-registry: requests per second with ab (keep-alive,
# 16 at once), and containerd's CPU time while the agent is asked (0 when no request
# reaches it).
MANIFESTS=${MANIFESTS:-20000}
printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}' >"$WORK/config.json"
CONFIG_DIGEST="sha256:$(sha256sum "$WORK/config.json" | cut -d' ' -f1)"
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"%s","size":%s}]}' \
  "$CONFIG_DIGEST" "$(stat -c %s "$WORK/config.json")" "$DIGEST" $((SIZE_MIB * 1024 * 1024)) >"$WORK/manifest.json"
MANIFEST_DIGEST="sha256:$(sha256sum "$WORK/manifest.json" | cut -d' ' -f1)"
for f in config manifest; do
  d="sha256:$(sha256sum "$WORK/$f.json" | cut -d' ' -f1)"
  size=$(stat -c %s "$WORK/$f.json")
  ctr --address "$WORK/containerd.sock" -n k8s.io content ingest --expected-digest "$d" \
    --expected-size "$size" "bench-$f" <"$WORK/$f.json"
  ctr --address "$WORK/containerd.sock" -n k8s.io content label "$d" containerd.io/gc.root=bench >/dev/null
done
LOC=$(curl -fsi -X POST http://127.0.0.1:15003/v2/bench/blob/blobs/uploads/ | tr -d '\r' | awk -F': ' 'tolower($1)=="location"{print $2}')
case "$LOC" in http*) ;; *) LOC="http://127.0.0.1:15003$LOC" ;; esac
curl -fs -X PUT -H 'Content-Type: application/octet-stream' -T "$WORK/config.json" "$LOC&digest=$CONFIG_DIGEST" >/dev/null
curl -fs -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' -T "$WORK/manifest.json" \
  http://127.0.0.1:15003/v2/bench/blob/manifests/v1 >/dev/null
ACCEPT='Accept: application/vnd.oci.image.manifest.v1+json'
AGENT_MANIFEST="http://127.0.0.1:15001/v2/bench/blob/manifests/$MANIFEST_DIGEST?ns=example.com"
curl -fs -o /dev/null -H "$ACCEPT" "$AGENT_MANIFEST" # the first request reads containerd
rps() { ab -q -k -n "$MANIFESTS" -c 16 -H "$ACCEPT" "$1" | awk '/^Requests per second/ {print $4} /^Non-2xx/ {print "non-2xx:", $3 > "/dev/stderr"}'; }
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
CONTAINERD=${PIDS[0]}
before=$(cpu "$CONTAINERD")
agent_rps=$(rps "$AGENT_MANIFEST")
during=$(( $(cpu "$CONTAINERD") - before ))
registry_rps=$(rps "http://127.0.0.1:15003/v2/bench/blob/manifests/$MANIFEST_DIGEST")
echo "manifest by digest, $MANIFESTS requests (ab, keep-alive, 16 at once):"
printf '  %-42s %8s req/s (containerd CPU meanwhile: %s ms)\n' "mirrorlet (kept in memory after one read)" "$agent_rps" "$(( during * 1000 / $(getconf CLK_TCK) ))"
printf '  %-42s %8s req/s\n' "docker-registry 2.8 (Distribution)" "$registry_rps"
