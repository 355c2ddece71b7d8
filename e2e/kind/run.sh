#!/usr/bin/env bash
# The kind-based end-to-end suite, for machines with Docker: a real Kubernetes cluster
# (3 nodes), mirrorlet installed with its Helm chart, a Distribution registry as upstream.
#
# It runs the same scenarios as the network-namespace suite (e2e/tests), one for one:
#   node_local a-e + teardown  <->  e2e/tests/node_local.rs
#   p2p a-f                    <->  e2e/tests/p2p.rs
#   pullthrough a-h            <->  e2e/tests/pullthrough.rs
# Keep the two in step when either changes. This suite cannot run on the development
# machine (no Docker engine there); the namespace suite is what CI runs.
#
# Needs: docker, kind, kubectl, helm, skopeo, cargo. Usage: e2e/kind/run.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
KIND_DIR="$ROOT/e2e/kind"
CLUSTER=mirrorlet-e2e
UPSTREAM=mirrorlet-e2e-upstream
REG=registry.e2e.test
PUSH=127.0.0.1:5055
WORK=$(mktemp -d)
# Pull-through scenarios use registries of their own (the node-local and peer-to-peer ones
# run with pull-through off for $REG): a plain one with tc (bandwidth caps) and an access
# log, a private one (htpasswd), and two Docker-Hub-like fronts (a budget of one manifest
# GET; a CDN that can flip a byte), all in the tools image.
PT_REG=pt.e2e.test; HUB_REG=hub.e2e.test; FLAKY_REG=flaky.e2e.test; PRIV_REG=private.e2e.test
PT_UP=mirrorlet-e2e-pt; PRIV_UP=mirrorlet-e2e-private; HUB=mirrorlet-e2e-hub; FLAKY=mirrorlet-e2e-flaky
PT_PUSH=127.0.0.1:5056; PRIV_PUSH=127.0.0.1:5057; HUB_ADMIN=127.0.0.1:5058; FLAKY_ADMIN=127.0.0.1:5059

for tool in docker kind kubectl helm skopeo cargo; do
  command -v "$tool" >/dev/null || { echo "kind e2e: $tool is required" >&2; exit 2; }
done

cleanup() {
  local rc=$?
  if ((rc != 0)); then
    echo "--- failure: agent logs ---"
    kubectl logs -l app.kubernetes.io/name=mirrorlet --tail=50 --prefix 2>/dev/null || true
  fi
  kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  docker rm -f "$UPSTREAM" "$PT_UP" "$PRIV_UP" "$HUB" "$FLAKY" >/dev/null 2>&1 || true
  rm -rf "$WORK"
  exit $rc
}
trap cleanup EXIT

pass() { echo "PASS $*"; }
fail() { echo "FAIL $*" >&2; exit 1; }
nodes() { kind get nodes --name "$CLUSTER" | sort; }
node() { nodes | sed -n "${1}p"; }                       # node N (1-based)
crictl_pull() { docker exec "$1" crictl pull "$2" >/dev/null; }
has_image() { docker exec "$1" crictl inspecti "$2" >/dev/null 2>&1; }
pod_on() { kubectl get pod -l app.kubernetes.io/name=mirrorlet --field-selector "spec.nodeName=$1" -o jsonpath='{.items[0].metadata.name}'; }
# GET a path of the agent on a node through the API server's pod proxy.
agent() { kubectl get --raw "/api/v1/namespaces/default/pods/$(pod_on "$1"):5000/proxy$2"; }
metric() { # node, metric name, label filter (grep -E), sums matching samples
  agent "$1" /metrics | grep -E "^$2" | grep -E "${3:-.}" | awk '{s+=$NF} END {print s+0}'
}
# Runs curl inside a node (the node image has curl) against an agent pod IP.
agent_ip() { kubectl get pod "$(pod_on "$1")" -o jsonpath='{.status.podIP}'; }
node_curl() { local n=$1; shift; docker exec "$n" curl -s "$@"; }
wait_for() { # seconds, description, command...
  local limit=$1 what=$2; shift 2
  for _ in $(seq "$((limit * 5))"); do "$@" && return 0; sleep 0.2; done
  fail "timed out waiting for $what"
}

echo "== building images"
docker build -q -t mirrorlet:e2e "$ROOT" >/dev/null
docker build -q -t mirrorlet-e2e-tools:e2e -f "$KIND_DIR/Dockerfile.tools" "$ROOT" >/dev/null
docker create --name mirrorlet-extract mirrorlet:e2e >/dev/null
docker cp mirrorlet-extract:/mirrorlet "$WORK/mirrorlet"
docker rm mirrorlet-extract >/dev/null
chmod +x "$WORK/mirrorlet"

echo "== cluster, upstream registry, test images"
kind create cluster --name "$CLUSTER" --config "$KIND_DIR/kind-config.yaml" --wait 120s
docker run -d --name "$UPSTREAM" --network kind -p "$PUSH:5000" registry:2 >/dev/null
wait_for 30 "the upstream registry" curl -fs "http://$PUSH/v2/"
cargo run -q --release --manifest-path "$ROOT/Cargo.toml" -p mirrorlet-e2e --bin e2e-images -- "$PUSH"
ip_of() { docker inspect -f '{{.NetworkSettings.Networks.kind.IPAddress}}' "$1"; }
docker run -d --name "$PT_UP" --network kind --cap-add NET_ADMIN -p "$PT_PUSH:5000" --entrypoint /registry.sh mirrorlet-e2e-tools:e2e >/dev/null
docker run -d --name "$PRIV_UP" --network kind -e USER=alice -e PASSWORD=s3cret -p "$PRIV_PUSH:5000" --entrypoint /registry.sh mirrorlet-e2e-tools:e2e >/dev/null
PT_IP=$(ip_of "$PT_UP"); PRIV_IP=$(ip_of "$PRIV_UP")
for f in "$HUB:$HUB_ADMIN:1" "$FLAKY:$FLAKY_ADMIN:none"; do
  IFS=: read -r name ip port budget <<<"$f"
  docker run -d --name "$name" --network kind -p "$ip:$port:6000" --entrypoint sh mirrorlet-e2e-tools:e2e \
    -c "exec /hub-front \"\$(hostname -i):6000\" \"\$(hostname -i):6001\" http://$PT_IP:5000 $budget" >/dev/null
done
HUB_IP=$(ip_of "$HUB"); FLAKY_IP=$(ip_of "$FLAKY")
wait_for 30 "the pull-through registry" curl -fs "http://$PT_PUSH/v2/"
wait_for 30 "the fronts" sh -c "curl -fs http://$HUB_ADMIN/admin/stats && curl -fs http://$FLAKY_ADMIN/admin/stats" >/dev/null
for set in pullthrough hub; do
  cargo run -q --release --manifest-path "$ROOT/Cargo.toml" -p mirrorlet-e2e --bin e2e-images -- "$PT_PUSH" "$set"
done
cargo run -q --release --manifest-path "$ROOT/Cargo.toml" -p mirrorlet-e2e --bin e2e-images -- "$PRIV_PUSH" private alice:s3cret
kind load docker-image --name "$CLUSTER" mirrorlet:e2e mirrorlet-e2e-tools:e2e

# The user's own hosts.toml before mirrorlet (as in the namespace suite).
for n in $(nodes); do
  for r in "$REG=$UPSTREAM:5000" "docker.io=$UPSTREAM:5000" "$PT_REG=$PT_UP:5000" "$PRIV_REG=$PRIV_UP:5000" \
           "$HUB_REG=$HUB:6000" "$FLAKY_REG=$FLAKY:6000"; do
    name=${r%%=*}; at=${r#*=}
    docker exec "$n" mkdir -p "/etc/containerd/certs.d/$name"
    printf '# upstream for the e2e cluster\nserver = "http://%s"\n\n[host."http://%s"]\n  capabilities = ["pull", "resolve"]\n' \
      "$at" "$at" | docker exec -i "$n" tee "/etc/containerd/certs.d/$name/hosts.toml" >/dev/null
  done
  docker exec "$n" sh -c 'cd /etc/containerd/certs.d && find . -type f | sort | xargs sha256sum' >"$WORK/certs-before-$n"
done

kubectl create secret docker-registry regcred --docker-server="$PRIV_REG" \
  --docker-username=alice --docker-password=s3cret >/dev/null
helm install mirrorlet "$ROOT/charts/mirrorlet" --wait --timeout 180s \
  --set image.repository=mirrorlet --set image.tag=e2e --set image.pullPolicy=Never \
  --set "mirror.registries={$REG,docker.io,$PT_REG,$HUB_REG,$FLAKY_REG,$PRIV_REG}" --set p2p.uploadLimit=134217728 \
  --set log.format=text --set "extraArgs={--peer-read-timeout=1s}" \
  --set "upstream.registries={$PT_REG,$HUB_REG,$FLAKY_REG,$PRIV_REG}" \
  --set-json "upstream.endpoints=[\"$PT_REG=http://$PT_IP:5000\",\"$HUB_REG=http://$HUB_IP:6000\",\"$FLAKY_REG=http://$FLAKY_IP:6000\",\"$PRIV_REG=http://$PRIV_IP:5000\"]" \
  --set upstream.credentialsSecret=regcred --set upstream.tagRevalidate=2s
N1=$(node 1); N2=$(node 2); N3=$(node 3)

echo "== node-local scenarios (e2e/tests/node_local.rs)"
# a: a pull of an image the node does not hold falls through to upstream; the miss is counted.
crictl_pull "$N1" "$REG/e2e/multi-layer:v1"
(( $(metric "$N1" mirrorlet_registry_requests_total 'status="404".*upstream-fallthrough') >= 1 )) || fail "node_local a: miss not counted"
pass "node_local a"

# b: content on the node is served byte-identical to upstream (manifests, blobs, HEAD, ranges).
crictl_pull "$N1" "$REG/e2e/multi-arch:v1"
crictl_pull "$N1" "docker.io/library/e2e-hub:1"
IP1=$(agent_ip "$N1")
for ref in "e2e/multi-layer/manifests/v1?ns=$REG" "library/e2e-hub/manifests/1?ns=docker.io" "e2e-hub/manifests/1"; do
  path=${ref%%\?*}; up_path=$path; [[ $path == e2e-hub/* ]] && up_path="library/$path"
  want=$(curl -fs -H 'Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json' "http://$PUSH/v2/$up_path" | sha256sum)
  got=$(node_curl "$N2" -f -H 'Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json' "http://$IP1:5000/v2/$ref" | sha256sum)
  [[ $want == "$got" ]] || fail "node_local b: $ref differs from upstream"
done
for d in $(curl -fs -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://$PUSH/v2/e2e/multi-layer/manifests/v1" | grep -o 'sha256:[0-9a-f]\{64\}'); do
  want=$(curl -fs "http://$PUSH/v2/e2e/multi-layer/blobs/$d" | sha256sum | cut -d' ' -f1)
  [[ "sha256:$want" == "$d" ]] || fail "node_local b: upstream blob $d"
  got=$(node_curl "$N2" -f -H 'x-mirrorlet-peer: 1' "http://$IP1:5000/v2/e2e/multi-layer/blobs/$d?ns=$REG" | sha256sum | cut -d' ' -f1)
  [[ "sha256:$got" == "$d" ]] || fail "node_local b: blob $d differs"
  want_range=$(curl -fs -H 'Range: bytes=10-99' "http://$PUSH/v2/e2e/multi-layer/blobs/$d" | sha256sum)
  got_range=$(node_curl "$N2" -f -H 'x-mirrorlet-peer: 1' -H 'Range: bytes=10-99' "http://$IP1:5000/v2/e2e/multi-layer/blobs/$d?ns=$REG" | sha256sum)
  [[ $want_range == "$got_range" ]] || fail "node_local b: range of $d differs"
done
pass "node_local b"

# c: with the agent gone from a node, pulls there still succeed through upstream.
kubectl label node "$N3" mirrorlet-e2e/no-agent=true --overwrite >/dev/null
kubectl patch ds mirrorlet --type merge -p '{"spec":{"template":{"spec":{"affinity":{"nodeAffinity":{"requiredDuringSchedulingIgnoredDuringExecution":{"nodeSelectorTerms":[{"matchExpressions":[{"key":"mirrorlet-e2e/no-agent","operator":"DoesNotExist"}]}]}}}}}}}' >/dev/null
wait_for 60 "the agent to leave node 3" sh -c "! kubectl get pod -l app.kubernetes.io/name=mirrorlet --field-selector spec.nodeName=$N3 -o name | grep -q ."
crictl_pull "$N3" "$REG/e2e/multi-layer:v1"
crictl_pull "$N3" "$REG/e2e/multi-arch:v1"
kubectl patch ds mirrorlet --type json -p '[{"op":"remove","path":"/spec/template/spec/affinity/nodeAffinity"}]' >/dev/null
kubectl rollout status ds mirrorlet --timeout 120s >/dev/null
pass "node_local c"

# d: configure then cleanup leave certs.d exactly as it was.
docker cp "$WORK/mirrorlet" "$N2:/usr/local/bin/mirrorlet"
docker exec "$N2" mirrorlet cleanup --config-path /etc/containerd/certs.d
docker exec "$N2" sh -c 'cd /etc/containerd/certs.d && find . -type f | sort | xargs sha256sum' >"$WORK/certs-restored"
diff -u "$WORK/certs-before-$N2" "$WORK/certs-restored" || fail "node_local d: cleanup did not restore certs.d"
docker exec "$N2" mirrorlet configure --config-path /etc/containerd/certs.d --registries "$REG,docker.io,_default" --mirror-url "http://$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$N2"):30020"
docker exec "$N2" mirrorlet configure --config-path /etc/containerd/certs.d --registries "$REG,docker.io,_default" --mirror-url "http://$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$N2"):30020"
docker exec "$N2" mirrorlet cleanup --config-path /etc/containerd/certs.d
docker exec "$N2" sh -c 'cd /etc/containerd/certs.d && find . -type f | sort | xargs sha256sum' >"$WORK/certs-restored"
diff -u "$WORK/certs-before-$N2" "$WORK/certs-restored" || fail "node_local d: configure+cleanup changed certs.d"
kubectl delete pod "$(pod_on "$N2")" --wait >/dev/null   # its init container configures again
kubectl rollout status ds mirrorlet --timeout 120s >/dev/null
pass "node_local d"

# e: containerd restarted under a running agent: it recovers and serves again.
before=$(kubectl get pod "$(pod_on "$N1")" -o jsonpath='{.status.containerStatuses[0].restartCount}')
docker exec "$N1" systemctl restart containerd
wait_for 60 "the agent on node 1 to be ready again" sh -c "kubectl get --raw /api/v1/namespaces/default/pods/$(pod_on "$N1"):5000/proxy/readyz >/dev/null 2>&1"
node_curl "$N2" -f -I -H 'x-mirrorlet-peer: 1' "http://$IP1:5000/v2/e2e/multi-layer/manifests/v1?ns=$REG" >/dev/null || fail "node_local e: not serving"
after=$(kubectl get pod "$(pod_on "$N1")" -o jsonpath='{.status.containerStatuses[0].restartCount}')
[[ $before == "$after" ]] || fail "node_local e: the agent restarted"
pass "node_local e"

# Starts node 2's pull of the big image in the background (PID in $PULL) and sets $serving
# to the node (1 or 3) that has served it 32 MiB since; empty if none did within 30 s.
pull_big_on_node2_and_catch_server() {
  local b1 b3 s1 s3
  b1=$(metric "$N1" mirrorlet_registry_peer_served_bytes_total); b3=$(metric "$N3" mirrorlet_registry_peer_served_bytes_total)
  docker exec "$N2" crictl pull "$REG/e2e/big:v1" >/dev/null & PULL=$!
  serving=""
  for _ in $(seq 300); do
    s1=$(metric "$N1" mirrorlet_registry_peer_served_bytes_total); s3=$(metric "$N3" mirrorlet_registry_peer_served_bytes_total)
    if awk -v a="$s1" -v b="$b1" 'BEGIN{exit !(a-b > 33554432)}'; then serving=$N1; return; fi
    if awk -v a="$s3" -v b="$b3" 'BEGIN{exit !(a-b > 33554432)}'; then serving=$N3; return; fi
    sleep 0.1
  done
}

echo "== peer-to-peer scenarios (e2e/tests/p2p.rs)"
# a: node 1 pulls from upstream; upstream stops; node 2 pulls by tag, node 3 by digest.
DIGEST=$(curl -fsI -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://$PUSH/v2/e2e/p2p-app/manifests/v1" | tr -d '\r' | awk -F': ' 'tolower($1)=="docker-content-digest"{print $2}')
crictl_pull "$N1" "$REG/e2e/p2p-app:v1"
crictl_pull "$N1" "$REG/e2e/big:v1"
crictl_pull "$N3" "$REG/e2e/big:v1"
docker stop "$UPSTREAM" >/dev/null
sleep 2
crictl_pull "$N2" "$REG/e2e/p2p-app:v1"
docker exec "$N3" crictl rmi "$REG/e2e/p2p-app:v1" >/dev/null 2>&1 || true
crictl_pull "$N3" "$REG/e2e/p2p-app@$DIGEST"
(( $(metric "$N1" mirrorlet_registry_peer_served_bytes_total) > 0 )) || fail "p2p a: node 1 served nothing"
pass "p2p a"

# b: an image nobody has, upstream down: the pull fails with a clear error within 5 s.
start=$(date +%s)
if docker exec "$N2" timeout 5 crictl pull "$REG/e2e/nobody-has-this:v1" 2>"$WORK/err"; then fail "p2p b: pulled"; fi
(( $(date +%s) - start <= 5 )) || fail "p2p b: hung"
grep -qiE "connection refused|not found|no such host" "$WORK/err" || fail "p2p b: unclear error: $(cat "$WORK/err")"
pass "p2p b"

# d: the agent serving node 2 a 256 MiB blob is killed midway; node 3 also holds it.
pull_big_on_node2_and_catch_server
[[ -n $serving ]] || fail "p2p d: node 2 never streamed from a peer"
kubectl delete pod "$(pod_on "$serving")" --grace-period=0 --force >/dev/null 2>&1
wait $PULL || fail "p2p d: node 2's pull failed"
(( $(metric "$N2" mirrorlet_peer_resumes_total) >= 1 )) || fail "p2p d: no resume"
kubectl rollout status ds mirrorlet --timeout 120s >/dev/null
pass "p2p d"

# f: a serving node's link is cut mid-pull; the pull completes from the others.
docker exec "$N2" crictl rmi "$REG/e2e/big:v1" >/dev/null
sleep 3
pull_big_on_node2_and_catch_server
[[ -n $serving ]] || fail "p2p f: node 2 never streamed from a peer"
docker network disconnect kind "$serving"
wait $PULL || fail "p2p f: node 2's pull failed"
docker network connect kind "$serving"
pass "p2p f"

# e: a peer serving corrupt bytes: the pull completes from another source, nothing wrong is stored.
docker start "$UPSTREAM" >/dev/null
wait_for 30 "the upstream registry" curl -fs "http://$PUSH/v2/"
urls=""
for d in $(curl -fs -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://$PUSH/v2/e2e/p2p-other/manifests/v1" | grep -o 'sha256:[0-9a-f]\{64\}'); do
  urls="$urls\"http://$UPSTREAM:5000/v2/e2e/p2p-other/blobs/$d\", "
done
sed -e "s|\"MIN_SIZE\"|\"0\"|" -e "s|BLOB_URLS|${urls%, }|" "$KIND_DIR/corrupt-peer.yaml" | kubectl apply -f - >/dev/null
wait_for 60 "the corrupt peer to advertise" sh -c 'kubectl logs corrupt-peer 2>/dev/null | grep -q advertised'
crictl_pull "$N2" "$REG/e2e/p2p-other:v1" || fail "p2p e: pull failed"
(( $(metric "$N2" mirrorlet_peer_digest_mismatches_total) >= 1 )) || fail "p2p e: corruption not detected"
kubectl delete pod corrupt-peer --grace-period=0 --force >/dev/null 2>&1
pass "p2p e"

# c: an image removed from node 1 (image deleted, content collected) is withdrawn.
docker exec "$N1" crictl rmi "$REG/e2e/p2p-app:v1" >/dev/null 2>&1 || true
docker exec "$N2" crictl rmi "$REG/e2e/p2p-app:v1" >/dev/null 2>&1 || true
docker exec "$N3" crictl rmi "$REG/e2e/p2p-app@$DIGEST" >/dev/null 2>&1 || true
IP3=$(agent_ip "$N3")
wait_for 30 "lookups to stop returning the removed image" sh -c \
  "[ \"\$(docker exec $N3 curl -s -o /dev/null -w '%{http_code}' -I http://$IP3:5000/v2/e2e/p2p-app/manifests/$DIGEST?ns=$REG)\" = 404 ]"
pass "p2p c"

echo "== pull-through scenarios (e2e/tests/pullthrough.rs)"
# Pulls IMAGE on every node at once; fails if any pull fails.
pull_all() {
  local pids=() n
  for n in $(nodes); do crictl_pull "$n" "$1" & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p" || return 1; done
}
log_lines() { docker logs "$1" 2>&1 | wc -l; }
log_since() { docker logs "$1" 2>&1 | tail -n +"$(($2 + 1))"; }
sum_metric() { local t=0 n; for n in $(nodes); do t=$(awk -v a="$t" -v b="$(metric "$n" "$@")" 'BEGIN{print a+b}'); done; echo "$t"; }
digests_of() { # repo at the pull-through registry: manifest digest, then config and layers
  curl -fsI -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://$PT_PUSH/v2/$1/manifests/v1" | tr -d '\r' | awk -F': ' 'tolower($1)=="docker-content-digest"{print $2}'
  curl -fs -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://$PT_PUSH/v2/$1/manifests/v1" | grep -o 'sha256:[0-9a-f]\{64\}'
}
stat_of() { curl -fs "http://$1/admin/stats" | grep -o "\"$2\":[0-9]*" | cut -d: -f2; }

# a: every node pulls a new image at once: one GET per blob and manifest, all by agents.
mark=$(log_lines "$PT_UP")
pull_all "$PT_REG/e2e/pt-burst:v1" || fail "pullthrough a: a pull failed"
log_since "$PT_UP" "$mark" | grep -E '"GET /v2/[^ ]*/(blobs|manifests)/sha256:' >"$WORK/gets"
for d in $(digests_of e2e/pt-burst | sort -u); do
  [[ $(grep -c "$d" "$WORK/gets") == 1 ]] || fail "pullthrough a: $d fetched $(grep -c "$d" "$WORK/gets") times"
done
! grep -v '"mirrorlet/' "$WORK/gets" | grep -q . || fail "pullthrough a: containerd went upstream itself"
pass "pullthrough a"

# b: the agent fetching a 160 MiB layer for the cluster is killed midway; every pull completes.
docker exec "$PT_UP" tc qdisc replace dev eth0 root tbf rate 300mbit burst 256kb latency 400ms
pids=(); for n in $(nodes); do crictl_pull "$n" "$PT_REG/e2e/pt-owner-dies:v1" & pids+=($!); done
owner=""
for _ in $(seq 300); do
  for n in $(nodes); do
    if awk -v a="$(metric "$n" mirrorlet_upstream_received_bytes_total)" 'BEGIN{exit !(a > 33554432)}'; then owner=$n; break 2; fi
  done
  sleep 0.2
done
[[ -n $owner ]] || fail "pullthrough b: no agent fetched the layer"
kubectl delete pod "$(pod_on "$owner")" --grace-period=0 --force >/dev/null 2>&1
for p in "${pids[@]}"; do wait "$p" || fail "pullthrough b: a pull failed"; done
docker exec "$PT_UP" tc qdisc del dev eth0 root
kubectl rollout status ds mirrorlet --timeout 120s >/dev/null
pass "pullthrough b"

# c: a hub with a budget of one counted pull serves every node; then the budget is spent.
pids=(); for n in "$N1" "$N2"; do crictl_pull "$n" "$HUB_REG/e2e/pt-hub:v1" & pids+=($!); done
for p in "${pids[@]}"; do wait "$p" || fail "pullthrough c: a pull failed"; done
[[ $(stat_of "$HUB_ADMIN" manifest_gets) == 1 ]] || fail "pullthrough c: more than one counted pull"
[[ $(stat_of "$HUB_ADMIN" rejected) == 0 ]] || fail "pullthrough c: 429s"
[[ $(stat_of "$HUB_ADMIN" blob_redirects) == 3 ]] || fail "pullthrough c: blobs fetched more than once"
[[ $(stat_of "$HUB_ADMIN" cdn_with_auth) == 0 ]] || fail "pullthrough c: credentials went to the CDN"
crictl_pull "$N3" "$HUB_REG/e2e/pt-hub:v1" || fail "pullthrough c: node 3 could not pull with the budget spent"
[[ $(stat_of "$HUB_ADMIN" manifest_gets) == 1 ]] || fail "pullthrough c: node 3 cost a counted pull"
if crictl_pull "$N1" "$HUB_REG/e2e/pt-hub-other:v1"; then fail "pullthrough c: pulled over the limit"; fi
awk -v a="$(sum_metric mirrorlet_upstream_rate_limited_total)" 'BEGIN{exit !(a >= 1)}' || fail "pullthrough c: 429 not counted"
pass "pullthrough c"

# d: a private upstream: the agents' credentials serve every node; with a wrong password,
# containerd's own attempt with the pod's pull secret still works, and the refusal is logged.
pull_all "$PRIV_REG/e2e/pt-private:v1" || fail "pullthrough d: pull with the agents' credentials"
kubectl create secret docker-registry regcred --docker-server="$PRIV_REG" --docker-username=alice \
  --docker-password=wrong --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl rollout restart ds mirrorlet >/dev/null && kubectl rollout status ds mirrorlet --timeout 120s >/dev/null
if crictl_pull "$N1" "$PRIV_REG/e2e/pt-private-2:v1"; then fail "pullthrough d: pulled without working credentials"; fi
docker exec "$N2" crictl pull --creds alice:s3cret "$PRIV_REG/e2e/pt-private-2:v1" >/dev/null || fail "pullthrough d: pull secret"
kubectl logs -l app.kubernetes.io/name=mirrorlet --tail=-1 | grep -q "refused the configured credentials" || fail "pullthrough d: no log line"
pass "pullthrough d"

# e: a tag moved upstream: after the window (2 s in this suite) every node pulls the new digest.
pull_all "$PT_REG/e2e/pt-moving:stable" || fail "pullthrough e: first pull"
cargo run -q --release --manifest-path "$ROOT/Cargo.toml" -p mirrorlet-e2e --bin e2e-images -- "$PT_PUSH" moved >/dev/null
new=$(curl -fsI -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://$PT_PUSH/v2/e2e/pt-moving/manifests/stable" | tr -d '\r' | awk -F': ' 'tolower($1)=="docker-content-digest"{print $2}')
sleep 3
pull_all "$PT_REG/e2e/pt-moving:stable" || fail "pullthrough e: pull after the move"
for n in $(nodes); do
  docker exec "$n" ctr -n k8s.io images ls "name==$PT_REG/e2e/pt-moving:stable" | grep -q "$new" || fail "pullthrough e: $n has the old digest"
done
pass "pullthrough e"

# g: a 128 MiB layer from a capped upstream reaches the client while it still downloads.
layer=$(digests_of e2e/pt-flowing | tail -1)
docker exec "$PT_UP" tc qdisc replace dev eth0 root tbf rate 200mbit burst 256kb latency 400ms
IP2=$(agent_ip "$N2")
before=$(sum_metric mirrorlet_upstream_received_bytes_total)
docker exec "$N2" sh -c "curl -s -o /tmp/flowing http://$IP2:5000/v2/e2e/pt-flowing/blobs/$layer?ns=$PT_REG" & CURL=$!
wait_for 60 "the first bytes" sh -c "[ \"\$(docker exec $N2 stat -c %s /tmp/flowing 2>/dev/null || echo 0)\" -gt 0 ]"
got=$(sum_metric mirrorlet_upstream_received_bytes_total)
awk -v a="$got" -v b="$before" 'BEGIN{exit !(a - b < 67108864)}' || fail "pullthrough g: nothing flowed before half the layer had arrived"
wait "$CURL" || fail "pullthrough g: transfer failed"
docker exec "$PT_UP" tc qdisc del dev eth0 root
crictl_pull "$N3" "$PT_REG/e2e/pt-flowing:v1" || fail "pullthrough g: CRI pull"
pass "pullthrough g"

# h: a CDN flips a byte of a layer: the first pull fails, nothing wrong is stored, the retry works.
layer=$(digests_of e2e/pt-corrupt | tail -1)
curl -fs -X POST "http://$FLAKY_ADMIN/admin/corrupt/$layer" || fail "pullthrough h: arming the corruption"
docker exec "$PT_UP" tc qdisc replace dev eth0 root tbf rate 200mbit burst 256kb latency 400ms
if crictl_pull "$N1" "$FLAKY_REG/e2e/pt-corrupt:v1"; then fail "pullthrough h: a corrupt layer was accepted"; fi
! docker exec "$N1" ctr -n k8s.io content ls -q | grep -q "$layer" || fail "pullthrough h: wrong bytes committed"
awk -v a="$(metric "$N1" mirrorlet_ingests_aborted_total)" 'BEGIN{exit !(a >= 1)}' || fail "pullthrough h: no abort"
docker exec "$PT_UP" tc qdisc del dev eth0 root
crictl_pull "$N1" "$FLAKY_REG/e2e/pt-corrupt:v1" || fail "pullthrough h: the retry failed"
pass "pullthrough h"

# f: the registry stops: tags the cluster holds still pull; a new image fails fast.
crictl_pull "$N1" "$PT_REG/e2e/pt-held:v1"
docker stop "$PT_UP" >/dev/null
sleep 3
crictl_pull "$N2" "$PT_REG/e2e/pt-held:v1" || fail "pullthrough f: node 2"
crictl_pull "$N3" "$PT_REG/e2e/pt-held:v1" || fail "pullthrough f: node 3"
awk -v a="$(sum_metric mirrorlet_stale_tags_served_total)" 'BEGIN{exit !(a >= 1)}' || fail "pullthrough f: no stale tag counted"
if docker exec "$N2" timeout 60 crictl pull "$PT_REG/e2e/pt-never:v1" >/dev/null 2>&1; then fail "pullthrough f: pulled"; fi
pass "pullthrough f"

echo "== teardown"
trap - EXIT
kind delete cluster --name "$CLUSTER"
docker rm -f "$UPSTREAM" "$PT_UP" "$PRIV_UP" "$HUB" "$FLAKY" >/dev/null
rm -rf "$WORK"
[[ -z $(docker ps -aq --filter "name=$CLUSTER") ]] || fail "teardown: containers left"
pass "teardown"
