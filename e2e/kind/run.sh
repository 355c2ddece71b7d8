#!/usr/bin/env bash
# The kind-based end-to-end suite, for machines with Docker: Kubernetes clusters made by
# kind, mirrorlet installed with its Helm chart, Distribution registries (and
# Docker-Hub-like fronts) as upstreams, every pull through the CRI as kubelet's are.
#
# Scenario for scenario with the network-namespace suite (e2e/tests, which CI runs):
#   node_local.rs  a_pull_of_an_image_not_on_the_node_falls_through_to_upstream     node_local a
#                  b_content_on_the_node_is_served_byte_identical_to_upstream       node_local b
#                  c_pulls_succeed_with_the_agent_stopped_or_killed                 node_local c
#                  d_configure_then_cleanup_leave_certs_d_as_it_was                 node_local d
#                  e_agent_recovers_when_containerd_restarts                        node_local e
#                  teardown_leaves_no_process_mount_or_namespace                    teardown
#   p2p.rs         a_nodes_pull_from_a_peer_by_tag_and_by_digest_with_upstream_down p2p a
#                  b_an_image_nobody_has_fails_fast_with_upstream_down              p2p b
#                  c_a_removed_image_is_withdrawn                                   p2p c
#                  d_the_serving_agent_killed_mid_blob_and_the_pull_completes_...   p2p d
#                  e_a_peer_serving_corrupt_bytes_never_gets_a_wrong_byte_accepted  p2p e
#                  f_a_peers_link_cut_mid_pull_and_the_pull_completes_from_others   p2p f
#                  g_a_full_spool_disk_is_logged_and_counted_and_the_pull_completes p2p g
#   pullthrough.rs a_nodes_pulling_a_new_image_at_once_cost_one_upstream_get_...    pullthrough a
#                  b_the_owner_killed_mid_layer_and_every_pull_completes            pullthrough b
#                  c_a_rate_limited_hub_with_a_budget_of_one_serves_every_node      pullthrough c
#                  d_a_private_upstream_with_the_right_and_the_wrong_credentials    pullthrough d
#                  e_a_tag_moved_upstream_is_pulled_anew_by_every_node_after_...    pullthrough e
#                  f_with_upstream_stopped_held_tags_pull_and_new_images_fail_...   pullthrough f
#                  g_a_big_layer_flows_to_containerd_while_it_downloads             pullthrough g
#                  h_wrong_bytes_from_the_registry_never_reach_containerds_store    pullthrough h
#                  i_ipv6_only_nodes_pull_through_their_agents_and_from_each_other  pullthrough i (own cluster)
#                  j_preheat_puts_images_on_every_node_for_one_upstream_fetch       pullthrough j (chart's preheat.images)
#                  k_private_images_need_the_pods_pull_secret_and_layers_come_...   pullthrough k (chart's upstream.private)
#   operations.rs  a_the_status_page_over_http_in_a_terminal_and_in_a_browser       operations a (no browser here)
#                  b_every_dashboard_query_names_metrics_and_labels_the_agents_...  operations b
#                  c_the_dashboard_evaluated_by_prometheus_has_data_in_every_panel  operations c (no preview picture)
#                  the_query_scanner_reads_selectors_and_groupings                  (unit test: none)
#   clients.rs     a_docker_pulls_through_the_agent_by_tag_and_by_digest_with_...   clients a
#                  b_podman_names_the_registry_in_the_mirror_and_never_gets_...     clients b
#                  (dockerd and podman run in a privileged tools container on the kind
#                  network and reach node 2's agent at its host port)
# The chart's own lifecycle, only here: install (always runs), upgrade, uninstall.
# Scenarios run in the order of SCENARIOS below. Differences: 3 nodes where the namespace
# suite uses 5 (pullthrough a, c), 2 where it uses 3 (pullthrough i); stopped agents come
# back through the kubelet, not the test; the agents live across scenarios, so counters
# are compared as differences over a scenario.
# Keep the two suites in step when either changes. This suite cannot run on the
# development machine (no Docker engine there); the namespace suite is what CI runs.
#
# Needs: docker, kind, kubectl, helm (3.8+), skopeo, cargo, protoc, jq, curl; an amd64
# host (e2e-images writes linux/amd64 images). Usage: e2e/kind/run.sh
#   MIRRORLET_KIND_ONLY=REGEX  run only the scenarios whose names match, e.g. 'p2p|operations a'
#                              (setup, install and teardown always run)
#   MIRRORLET_KIND_IPV6=1      run pullthrough i, which makes its own IPv6-only cluster. Off by
#                              default: it needs IPv6 on the "kind" Docker network, which kind
#                              creates only where the Docker daemon can (many hosts need
#                              "ipv6": true and "fixed-cidr-v6" in /etc/docker/daemon.json, and
#                              a "kind" network made before that must be removed); check with
#                              docker network inspect kind -f '{{.EnableIPv6}}'
#   MIRRORLET_KIND_KEEP=1      keep the clusters and containers at the end (for debugging)
#   MIRRORLET_KIND_PROMETHEUS=IMAGE  Prometheus image for operations c (prom/prometheus:v2.53.2)
#
# Scenario functions are called through run_scenario; jq filters name their own $variables.
# shellcheck disable=SC2317,SC2016
set -Eeuo pipefail
shopt -s inherit_errexit

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
KIND_DIR="$ROOT/e2e/kind"
CHART="$ROOT/charts/mirrorlet"
CLUSTER=mirrorlet-e2e
CLUSTER6=mirrorlet-e2e-ipv6
NS=default
RELEASE=mirrorlet
AGENTS=app.kubernetes.io/name=mirrorlet # the agent pods (the uninstall hook's are mirrorlet-cleanup)
IMAGE=mirrorlet:e2e
TOOLS=mirrorlet-e2e-tools:e2e
PROM_IMAGE=${MIRRORLET_KIND_PROMETHEUS:-prom/prometheus:v2.53.2}
REG_PORT=5000 OPS_PORT=5002 HOSTPORT=30020 HOSTPORT2=30021
CERTS=/etc/containerd/certs.d
SPOOL=/var/lib/mirrorlet/spool # the chart's dataDir/spool on a node
MARKER='# Written by mirrorlet configure'
ACCEPT='application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json'
# Upload limit of the agents: a 256 MiB blob takes seconds between two nodes, long enough
# to break it midway (p2p d, f).
UPLOAD_LIMIT=67108864

# Registries, containers on the kind network, pushed to at 127.0.0.1 ports. REG (and
# docker.io, at the same registry) serves the node-local and peer-to-peer scenarios, which
# run with pull-through off for it, as the namespace suite does; the agents pull the
# others through.
REG=registry.e2e.test UPSTREAM=mirrorlet-e2e-upstream PUSH=127.0.0.1:5055
PT_REG=pt.e2e.test PT_UP=mirrorlet-e2e-pt PT_PUSH=127.0.0.1:5056 # tc, access log
PRIV_REG=private.e2e.test PRIV_UP=mirrorlet-e2e-private PRIV_PUSH=127.0.0.1:5057 # htpasswd
# Docker-Hub-like fronts before PT_UP: budget of one counted pull (hub, ops, dash, prom),
# corrupt CDN (flaky).
HUB_REG=hub.e2e.test HUB=mirrorlet-e2e-hub HUB_ADMIN=127.0.0.1:5058
FLAKY_REG=flaky.e2e.test FLAKY=mirrorlet-e2e-flaky FLAKY_ADMIN=127.0.0.1:5059
OPS_REG=ops.e2e.test OPS=mirrorlet-e2e-ops OPS_ADMIN=127.0.0.1:5060
DASH_REG=dash.e2e.test DASH=mirrorlet-e2e-dash DASH_ADMIN=127.0.0.1:5061
PROM_REG=prom.e2e.test PROM=mirrorlet-e2e-prom PROM_ADMIN=127.0.0.1:5062
V6_REG=v6.e2e.test V6_UP=mirrorlet-e2e-v6 V6_PUSH=127.0.0.1:5063 # pullthrough i
MIRRORED=("$REG" docker.io "$PT_REG" "$HUB_REG" "$FLAKY_REG" "$PRIV_REG" "$OPS_REG" "$DASH_REG" "$PROM_REG")
PULLED_THROUGH=("$PT_REG" "$HUB_REG" "$FLAKY_REG" "$PRIV_REG" "$OPS_REG" "$DASH_REG" "$PROM_REG")

WORK="" SCENARIO=setup NODES=() N1="" N2="" N3="" PROBE="" ARCH=amd64
PASSED=() FAILED=() SKIPPED=()

# ---------------------------------------------------------------------------------------
# Reporting. PASS/FAIL lines go to fd 3 (stdout), also from inside $(...).

say() { printf '%s\n' "$*" >&3; }
log() { say "   $*"; }

# Ends the current scenario with a FAIL line naming it (the first failure only).
fail() {
  [[ -n $WORK && -e $WORK/failed ]] || say "FAIL $SCENARIO: $*"
  [[ -z $WORK ]] || : >"$WORK/failed"
  exit 1
}

# A command failing under set -e: the FAIL line names it, unless a helper already said why.
on_err() {
  local rc=$1 line=$2 cmd=$3
  ((BASH_SUBSHELL > 0)) || return 0
  [[ -n $WORK && ! -e $WORK/failed ]] || return 0
  say "FAIL $SCENARIO: \`$cmd\` failed (exit status $rc) at line $line"
  : >"$WORK/failed"
}

# ---------------------------------------------------------------------------------------
# Generic helpers.

# wait_for SECONDS WHAT COMMAND...: polls COMMAND (which must not call fail) until it succeeds.
wait_for() {
  local limit=$1 what=$2
  shift 2
  local deadline=$((SECONDS + limit))
  until "$@"; do
    ((SECONDS < deadline)) || fail "timed out after ${limit}s waiting for $what"
    sleep 0.5
  done
}

# holds A OP B: numeric comparison (OP one of >= > == <= <).
holds() {
  awk -v a="$1" -v op="$2" -v b="$3" 'BEGIN { a += 0; b += 0
    exit !((op == ">=" && a >= b) || (op == ">" && a > b) || (op == "==" && a == b) ||
           (op == "<=" && a <= b) || (op == "<" && a < b)) }'
}
expect() { holds "$2" "$3" "$4" || fail "$1 (got $2, want $3 $4)"; }
minus() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.6f\n", a - b }'; }
plus() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.6f\n", a + b }'; }

# Runs a command in the background with the suite's error trap off (its status is read by wait).
bg() { (trap - ERR; set +e; "$@") & }

# The file's contents, for messages.
tail_of() { tail -c "${2:-400}" "$1" 2>/dev/null | tr '\n' ' '; }

# ---------------------------------------------------------------------------------------
# Cluster and nodes.

kc() { kubectl --request-timeout=60s "$@"; }
nodes() { kind get nodes --name "$CLUSTER" | sort; }
load_nodes() { # NODES, N1..N3 (sorted: control-plane, worker, worker2) and PROBE, the node curl runs in
  mapfile -t NODES < <(nodes)
  (( ${#NODES[@]} >= 2 )) || fail "kind lists ${#NODES[@]} nodes for $CLUSTER"
  N1=${NODES[0]} N2=${NODES[1]} N3=${NODES[2]:-}
  PROBE=$N1
}
node_ip() {
  local ip
  ip=$(kc get node "$1" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}') || fail "kubectl get node $1 failed"
  [[ -n $ip ]] || fail "node $1 has no InternalIP"
  printf '%s\n' "$ip"
}
url_host() { if [[ $1 == *:* ]]; then printf '[%s]' "$1"; else printf '%s' "$1"; fi; }
ip_of() { docker inspect -f '{{.NetworkSettings.Networks.kind.IPAddress}}' "$1"; }
track() { echo "$1" >>"$WORK/containers"; } # a container the exit trap removes

# HTTP status of a GET (or HEAD with -I) from inside NODE; 000 if nothing answered.
code_from() {
  local n=$1
  shift
  docker exec "$n" curl -gs -o /dev/null -w '%{http_code}' --max-time 10 -H "Accept: $ACCEPT" "$@" || true
}
code_is() { [[ $(code_from "$PROBE" "${@:2}") == "$1" ]]; }

# certs.d as a listing: directories, then files with their checksums.
certs_snapshot() {
  docker exec "$1" sh -c "cd $CERTS && find . -type d | sort && find . -type f | sort | xargs -r sha256sum"
}
snapshot_is() { [[ $(certs_snapshot "$1" 2>/dev/null) == "$(<"$2")" ]]; }

# The user's own hosts.toml, as before mirrorlet (the namespace suite's user_hosts_toml).
user_hosts() { # node registry upstream-host:port
  docker exec "$1" mkdir -p "$CERTS/$2"
  printf '# upstream for the e2e cluster\nserver = "http://%s"\n\n[host."http://%s"]\n  capabilities = ["pull", "resolve"]\n' "$3" "$3" \
    | docker exec -i "$1" sh -c "cat >'$CERTS/$2/hosts.toml'"
}

# Changes undone by the exit trap and after a failed scenario.
stop_service() { # node unit
  echo "$1 $2" >>"$WORK/stopped"
  docker exec "$1" systemctl stop "$2"
}
start_services() {
  [[ -s $WORK/stopped ]] || return 0
  local n unit
  while read -r n unit; do docker exec "$n" systemctl start "$unit" >/dev/null 2>&1 || true; done <"$WORK/stopped"
  : >"$WORK/stopped"
}
tc_cap() { # registry container, rate
  echo "$1" >>"$WORK/capped"
  docker exec "$1" tc qdisc replace dev eth0 root tbf rate "$2" burst 256kb latency 400ms
}
tc_uncap() { docker exec "$1" tc qdisc del dev eth0 root >/dev/null 2>&1 || true; }
spool_full() { # node: a 4 KiB tmpfs over the agents' spool (the pod must be replaced to see it)
  echo "$1" >>"$WORK/spools"
  docker exec "$1" sh -c "mkdir -p $SPOOL && mount -t tmpfs -o size=4k tmpfs $SPOOL"
}
spool_free_all() { # the pods are replaced by the caller (or are gone, at exit)
  [[ -s $WORK/spools ]] || return 0
  local n
  while read -r n; do docker exec "$n" umount -l "$SPOOL" >/dev/null 2>&1 || true; done < <(sort -u "$WORK/spools")
  : >"$WORK/spools"
}
tc_uncap_all() {
  [[ -s $WORK/capped ]] || return 0
  local c
  while read -r c; do tc_uncap "$c"; done < <(sort -u "$WORK/capped")
  : >"$WORK/capped"
}

# ---------------------------------------------------------------------------------------
# Agents. Pods, IPs and containers are looked up at each use: they change when an agent
# restarts or its pod is replaced.

agent_json_try() { # node: its one agent pod (not terminating), as JSON
  local json
  json=$(kc get pods -n "$NS" -l "$AGENTS" --field-selector "spec.nodeName=$1" -o json 2>/dev/null) || return 1
  jq -ce '[.items[] | select(.metadata.deletionTimestamp == null)] | if length == 1 then .[0] else empty end' <<<"$json"
}
agent_field() { # node jq-filter
  local pod v
  pod=$(agent_json_try "$1") || fail "no single running agent pod on $1"
  v=$(jq -er "$2" <<<"$pod") || fail "the agent pod on $1 has no $2"
  printf '%s\n' "$v"
}
agent_pod() { agent_field "$1" .metadata.name; }
agent_uid() { agent_field "$1" .metadata.uid; }
agent_ip() { agent_field "$1" .status.podIP; }
agent_restarts() { agent_field "$1" '.status.containerStatuses[] | select(.name == "mirrorlet") | .restartCount'; }
agent_ip_try() { local pod; pod=$(agent_json_try "$1") || return 1; jq -er .status.podIP <<<"$pod"; }
agent_url() { local ip; ip=$(agent_ip "$1"); printf 'http://%s:%s' "$(url_host "$ip")" "$REG_PORT"; } # its registry

# The agent's container on NODE, through the node's CRI.
agent_cid() {
  local ids
  ids=$(docker exec "$1" crictl ps --name '^mirrorlet$' --label "io.kubernetes.pod.namespace=$NS" --state running -q) \
    || fail "crictl ps on $1 failed"
  [[ -n $ids && $(wc -l <<<"$ids") == 1 ]] || fail "not one running agent container on $1: [$ids]"
  printf '%s\n' "$ids"
}
agent_pid() { # in the node's PID namespace
  local cid info
  cid=$(agent_cid "$1")
  info=$(docker exec "$1" crictl inspect "$cid") || fail "crictl inspect $cid on $1 failed"
  jq -er '.info.pid' <<<"$info" || fail "no pid for the agent container $cid on $1"
}
alive() { docker exec "$1" sh -c "kill -0 $2" 2>/dev/null; }
gone() { ! alive "$@"; }

# agent_ready NODE [OLD-UID] [MIN-RESTARTS]: one agent pod on NODE, not OLD-UID, Ready, its
# agent container ready and restarted at least MIN-RESTARTS times.
agent_ready() {
  local pod
  pod=$(agent_json_try "$1") || return 1
  jq -e --arg old "${2:-}" --argjson min "${3:-0}" '.metadata.uid != $old
    and any(.status.conditions[]?; .type == "Ready" and .status == "True")
    and any(.status.containerStatuses[]?; .name == "mirrorlet" and .ready and .restartCount >= $min)' <<<"$pod" >/dev/null
}
wait_agents() {
  local n
  for n in "${NODES[@]}"; do wait_for 240 "the agent on $n to be ready" agent_ready "$n"; done
}
agent_uids() { local n; for n in "${NODES[@]}"; do agent_uid "$n"; done; }
# After a change of the pod template: a new pod on every node (not one of OLD-UIDS), ready.
wait_replaced() { # old uids, one per node, in NODES order
  local i=0 n
  local -a old=("$@")
  for n in "${NODES[@]}"; do
    wait_for 300 "a new agent pod on $n (replacing ${old[i]})" agent_ready "$n" "${old[i]}"
    i=$((i + 1))
  done
  kubectl rollout status "ds/$RELEASE" -n "$NS" --timeout=120s >/dev/null
}

# The operational listener (metrics, livez, readyz, status) of an agent pod at IP.
ops_ip_try() { docker exec "$PROBE" curl -gsf --max-time 20 "http://$(url_host "$1"):$OPS_PORT$2"; }
ops() { # node path: the body; fails the scenario naming what failed
  local ip out
  ip=$(agent_ip "$1")
  out=$(docker exec "$PROBE" curl -gsS -f --max-time 20 "http://$(url_host "$ip"):$OPS_PORT$2" 2>&1) \
    || fail "GET $2 on the agent of $1 ($ip:$OPS_PORT): ${out:0:300}"
  printf '%s\n' "$out"
}
ops_code_try() { # node path: HTTP status, 000 without an answer or pod
  local ip
  ip=$(agent_ip_try "$1") || { echo 000; return 0; }
  code_from "$PROBE" "http://$(url_host "$ip"):$OPS_PORT$2"
}
ops_code_is() { [[ $(ops_code_try "$1" "$2") == "$3" ]]; }

# sum_samples NAME [LABEL=VALUE...] < metrics text: the sum of the samples of exactly NAME
# whose labels include all those given.
sum_samples() {
  local name=$1
  shift
  awk -v name="$name" -v filters="$*" '
    BEGIN { nf = split(filters, f, " ") }
    /^#/ || NF < 2 { next }
    {
      series = $0; sub(/ [^ ]+$/, "", series)
      m = series; labels = ""
      i = index(series, "{")
      if (i) { m = substr(series, 1, i - 1); labels = substr(series, i + 1); sub(/}$/, "", labels) }
      if (m != name) next
      for (j = 1; j <= nf; j++) {
        eq = index(f[j], "=")
        if (index("," labels ",", "," substr(f[j], 1, eq - 1) "=\"" substr(f[j], eq + 1) "\",") == 0) next
      }
      s += $NF
    }
    END { printf "%.6f\n", s }'
}
metric() { # node name [label=value...]
  local n=$1 text
  shift
  text=$(ops "$n" /metrics) || return 1
  sum_samples "$@" <<<"$text"
}
metric_try() { # like metric, status 1 when the agent does not answer
  local ip text
  ip=$(agent_ip_try "$1") || return 1
  shift
  text=$(ops_ip_try "$ip" /metrics) || return 1
  sum_samples "$@" <<<"$text"
}
sum_metric() { # over every node's agent
  local total=0 n v
  for n in "${NODES[@]}"; do
    v=$(metric "$n" "$@")
    total=$(plus "$total" "$v")
  done
  printf '%s\n' "$total"
}
members_ok() { # every agent knows every other (idle connections close: not "connected")
  local n v want=$((${#NODES[@]} - 1))
  for n in "${NODES[@]}"; do
    v=$(metric_try "$n" mirrorlet_p2p_routing_table_peers) || return 1
    holds "$v" ">=" "$want" || return 1
  done
}
wait_members() { wait_for 120 "every agent to have the others in its routing table" members_ok; }
status_json() { # node: GET /status?format=json, checked to be JSON
  local json
  json=$(ops "$1" '/status?format=json')
  jq -e . >/dev/null <<<"$json" || fail "the status of $1 is not JSON: ${json:0:300}"
  printf '%s\n' "$json"
}
jcheck() { # what json jq-filter [jq args]: the filter must hold
  local what=$1 json=$2
  shift 2
  jq -e "$@" >/dev/null <<<"$json" || fail "$what: $(jq -c . <<<"$json" | head -c 1500)"
}
agent_logs() { # node: the agent container's log
  local pod
  pod=$(agent_pod "$1")
  kc logs -n "$NS" "$pod" -c mirrorlet --tail=-1
}

# ---------------------------------------------------------------------------------------
# Registries.

start_registry() { # name push-address [docker run options]
  local name=$1 at=$2
  shift 2
  track "$name"
  docker run -d --name "$name" --network kind -p "$at:5000" "$@" --entrypoint /registry.sh "$TOOLS" >/dev/null
}
start_front() { # name admin-address budget (in front of PT_UP)
  track "$1"
  docker run -d --name "$1" --network kind -p "$2:6000" --entrypoint /front.sh "$TOOLS" \
    "http://$(ip_of "$PT_UP"):5000" "$3" >/dev/null
}
registry_down() { docker exec "$1" /registry.sh stop; }
# registry_up CONTAINER PUSH-ADDRESS: running and answering. After being down, waits out
# the 5 s for which agents leave an unreachable pull-through registry alone.
registry_up() {
  local was_down=0
  if docker exec "$1" test -e /tmp/registry.down; then
    was_down=1
    docker exec "$1" /registry.sh start
  fi
  wait_for 30 "$1 to answer" curl -fs -o /dev/null --max-time 5 "http://$2/v2/"
  ((was_down == 0)) || sleep 6
}

# The registry's access log (combined format) as TSV: client method path status bytes agent.
access_log() {
  docker logs "$1" 2>&1 | awk '{
    k = index($0, "\""); if (!k) next
    rest = substr($0, k + 1); e = index(rest, "\""); if (!e) next
    split(substr(rest, 1, e - 1), r, " "); rest = substr(rest, e + 1)
    split(rest, f, " "); n = split(rest, q, "\"")
    if (f[1] !~ /^[0-9][0-9][0-9]$/ || n < 5) next
    printf "%s\t%s\t%s\t%s\t%s\t%s\n", $1, r[1], r[2], f[1], f[2], q[n - 1]
  }'
}
log_mark() { access_log "$1" | wc -l; }
log_since() { access_log "$1" | tail -n +"$(($2 + 1))"; }
# GETs of blobs and of manifests by digest (the namespace suite's is_content_get).
content_gets() { awk -F'\t' '$2 == "GET" && ($3 ~ /\/blobs\/sha256:/ || $3 ~ /\/manifests\/sha256:/)'; }
count_ending() { # digest < TSV: requests whose path ends with it
  awk -F'\t' -v d="$1" 'substr($3, length($3) - length(d) + 1) == d { c++ } END { print c + 0 }'
}

manifest_digest() { # base-url repo reference
  local head d
  head=$(curl -fsSI --max-time 20 -H "Accept: $ACCEPT" "$1/v2/$2/manifests/$3") || fail "HEAD $1/v2/$2/manifests/$3 failed"
  d=$(tr -d '\r' <<<"$head" | awk -F': ' 'tolower($1) == "docker-content-digest" { v = $2 } END { print v }')
  [[ $d == sha256:* ]] || fail "no digest for $2:$3 at $1"
  printf '%s\n' "$d"
}
manifest_body() { # base-url repo reference
  curl -fsS --max-time 20 -H "Accept: $ACCEPT" "$1/v2/$2/manifests/$3" || fail "GET $1/v2/$2/manifests/$3 failed"
}
blob_digests() { # base-url repo reference: config, then layers
  local body
  body=$(manifest_body "$@")
  jq -er '.config.digest, .layers[].digest' <<<"$body" || fail "$2:$3 at $1 is not an image manifest"
}
front_stat() { # admin-address key
  local json
  json=$(curl -fsS --max-time 10 "http://$1/admin/stats") || fail "the front's stats at $1"
  jq -er --arg k "$2" '.[$k]' <<<"$json" || fail "no $2 in the front's stats: $json"
}

# ---------------------------------------------------------------------------------------
# Images on nodes. Pull errors go to $WORK/pull.err.NODE.

pull() { # node image [seconds]: a CRI pull, as kubelet's
  docker exec "$1" timeout "${3:-300}" crictl pull "$2" >/dev/null 2>"$WORK/pull.err.$1"
}
must_pull() { pull "$@" || fail "$1 could not pull $2: $(tail_of "$WORK/pull.err.$1")"; }
ctr_pull() {
  docker exec "$1" timeout 120 ctr -n k8s.io images pull --hosts-dir "$CERTS" "$2" >/dev/null 2>"$WORK/pull.err.$1" \
    || fail "ctr pull of $2 on $1 failed: $(tail_of "$WORK/pull.err.$1")"
}
has_image() { docker exec "$1" crictl inspecti "$2" >/dev/null 2>&1; }
rm_image() {
  docker exec "$1" crictl rmi "$2" >/dev/null 2>&1 || true
  docker exec "$1" ctr -n k8s.io images rm "$2" >/dev/null 2>&1 || true
}
pull_all() { # image: every node at once
  local n i=0
  local -a pids=()
  for n in "${NODES[@]}"; do
    bg pull "$n" "$1"
    pids+=($!)
  done
  for n in "${NODES[@]}"; do
    wait "${pids[i]}" || fail "$n could not pull $1: $(tail_of "$WORK/pull.err.$n")"
    i=$((i + 1))
  done
}
# must_fail_pull NODE IMAGE SECONDS WHY: the pull fails, and not by running out of time.
must_fail_pull() {
  local rc=0
  pull "$1" "$2" "$3" || rc=$?
  ((rc != 0)) || fail "$1 pulled $2: $4"
  ((rc != 124)) || fail "$1's pull of $2 hung for $3 s instead of failing"
}
# (Output captured before grep: under pipefail a grep -q that stops early fails the pipeline.)
content_list() { docker exec "$1" ctr -n k8s.io content ls -q; }
content_has() { local c; c=$(content_list "$1") || return 1; grep -qF "$2" <<<"$c"; }
content_gone() { local c; c=$(content_list "$1") || return 1; ! grep -qF "$2" <<<"$c"; }

# ---------------------------------------------------------------------------------------
# Fetches, for byte-for-byte comparisons: OUT.code, OUT.head (CR stripped), OUT.body.

node_fetch() { # out method url [range]: from PROBE (agents are at pod IPs)
  local out=$1 method=$2 url=$3 range=${4:-}
  local -a args=(-gs --max-time 60 -H "Accept: $ACCEPT" -D /tmp/e2e.head -o /tmp/e2e.body -w '%{http_code}\n')
  [[ $method == HEAD ]] && args+=(-I)
  [[ -z $range ]] || args+=(-H "Range: $range")
  docker exec "$PROBE" sh -c 'rm -f /tmp/e2e.head /tmp/e2e.body; curl "$@" && tr -d "\r" </tmp/e2e.head' curl \
    "${args[@]}" "$url" >"$WORK/fetch.out" || fail "$method $url: no answer"
  head -n 1 "$WORK/fetch.out" >"$out.code"
  tail -n +2 "$WORK/fetch.out" >"$out.head"
  if [[ $method == GET ]]; then docker exec "$PROBE" cat /tmp/e2e.body >"$out.body"; else : >"$out.body"; fi
}
up_fetch() { # out method url [range]: from this machine (registries at 127.0.0.1 ports)
  local out=$1 method=$2 url=$3 range=${4:-}
  local -a args=(-gs --max-time 60 -H "Accept: $ACCEPT" -D "$out.rawhead" -o "$out.body" -w '%{http_code}')
  [[ $method == HEAD ]] && args+=(-I)
  [[ -z $range ]] || args+=(-H "Range: $range")
  curl "${args[@]}" "$url" >"$out.code" || fail "$method $url: no answer"
  tr -d '\r' <"$out.rawhead" >"$out.head"
  [[ $method == GET ]] || : >"$out.body"
}
hdr() { # headers-file name: its (last) value
  awk -v k="$2" 'BEGIN { k = tolower(k) }
    { i = index($0, ":"); if (i && tolower(substr($0, 1, i - 1)) == k) { v = substr($0, i + 1); sub(/^[ \t]+/, "", v); sub(/[ \t]+$/, "", v) } }
    END { print v }' "$1"
}
sha_of() { printf 'sha256:%s\n' "$(sha256sum "$1" | cut -d' ' -f1)"; }

# check_manifest NODE REPO REF NS OUT: GET and HEAD at NODE's agent answer as upstream's GET
# (status, Content-Type, Content-Length, Docker-Content-Digest, body); upstream's body to OUT.
check_manifest() {
  local n=$1 repo=$2 ref=$3 ns=$4 out=$5 url method h got want
  up_fetch "$WORK/up" GET "http://$PUSH/v2/$repo/manifests/$ref"
  [[ $(<"$WORK/up.code") == 200 ]] || fail "upstream has no $repo:$ref ($(<"$WORK/up.code"))"
  url="$(agent_url "$n")/v2/$repo/manifests/$ref?ns=$ns"
  for method in GET HEAD; do
    node_fetch "$WORK/got" "$method" "$url"
    [[ $(<"$WORK/got.code") == 200 ]] || fail "$method $url: status $(<"$WORK/got.code")"
    for h in content-type content-length docker-content-digest; do
      got=$(hdr "$WORK/got.head" "$h")
      want=$(hdr "$WORK/up.head" "$h")
      [[ $got == "$want" ]] || fail "$method $url: $h is '$got', upstream's '$want'"
    done
    if [[ $method == GET ]] && ! cmp -s "$WORK/got.body" "$WORK/up.body"; then fail "GET $url: the body differs from upstream's"; fi
  done
  cp "$WORK/up.body" "$out"
}

# check_blob NODE REPO DIGEST NS: byte-identical to upstream, HEAD headers as upstream's,
# ranges (a-b, suffix -n, open a-) answered 206 with the right bytes and Content-Range, a
# range past the end 416 as upstream answers it.
check_blob() {
  local n=$1 repo=$2 d=$3 ns=$4 url up h size a b spec range start end got want
  up="http://$PUSH/v2/$repo/blobs/$d"
  up_fetch "$WORK/up" GET "$up"
  up_fetch "$WORK/uphead" HEAD "$up"
  [[ $(<"$WORK/up.code") == 200 && $(sha_of "$WORK/up.body") == "$d" ]] || fail "upstream's $repo blob $d"
  url="$(agent_url "$n")/v2/$repo/blobs/$d?ns=$ns"
  node_fetch "$WORK/got" GET "$url"
  [[ $(<"$WORK/got.code") == 200 ]] || fail "GET $url: status $(<"$WORK/got.code")"
  [[ $(sha_of "$WORK/got.body") == "$d" ]] || fail "GET $url: the body's digest is $(sha_of "$WORK/got.body")"
  cmp -s "$WORK/got.body" "$WORK/up.body" || fail "GET $url: the body differs from upstream's"
  node_fetch "$WORK/got" HEAD "$url"
  [[ $(<"$WORK/got.code") == 200 ]] || fail "HEAD $url: status $(<"$WORK/got.code")"
  for h in content-length docker-content-digest; do
    got=$(hdr "$WORK/got.head" "$h")
    want=$(hdr "$WORK/uphead.head" "$h")
    [[ $got == "$want" ]] || fail "HEAD $url: $h is '$got', upstream's '$want'"
  done
  size=$(stat -c %s "$WORK/up.body")
  a=$((size / 4)) b=$((size / 2))
  for spec in "bytes=$a-$((b - 1)) $a $b" "bytes=-10 $((size - 10)) $size" "bytes=$((size - 5))- $((size - 5)) $size"; do
    read -r range start end <<<"$spec"
    node_fetch "$WORK/part" GET "$url" "$range"
    [[ $(<"$WORK/part.code") == 206 ]] || fail "$range of $url: status $(<"$WORK/part.code")"
    head -c "$end" "$WORK/up.body" | tail -c "$((end - start))" >"$WORK/slice"
    cmp -s "$WORK/part.body" "$WORK/slice" || fail "$range of $url: wrong bytes"
    got=$(hdr "$WORK/part.head" content-range)
    [[ $got == "bytes $start-$((end - 1))/$size" ]] || fail "$range of $url: Content-Range '$got'"
  done
  node_fetch "$WORK/part" GET "$url" "bytes=$size-"
  up_fetch "$WORK/uppart" GET "$up" "bytes=$size-"
  [[ $(<"$WORK/part.code") == 416 && $(<"$WORK/uppart.code") == 416 ]] \
    || fail "bytes=$size- of $url: status $(<"$WORK/part.code"), upstream's $(<"$WORK/uppart.code") (want 416)"
}

# ---------------------------------------------------------------------------------------
# Faults inside a node.

# Drops all of an agent's traffic but its ops port (the kubelet's probes), in its pod's
# network namespace. That covers peers fetching from it at its pod IP (5000), the DHT
# (5001) and containerd's way in through the hostPort, which is DNATed on the node to the
# pod IP and so also arrives through the pod's INPUT chain.
cut_agent() { # node pid
  echo "$1 $2" >>"$WORK/cuts"
  docker exec "$1" nsenter -t "$2" -n sh -ec "
    iptables -N E2E-CUT
    iptables -A E2E-CUT -p tcp --dport $OPS_PORT -j RETURN
    iptables -A E2E-CUT -p tcp --sport $OPS_PORT -j RETURN
    iptables -A E2E-CUT -j DROP
    iptables -I INPUT 1 -j E2E-CUT
    iptables -I OUTPUT 1 -j E2E-CUT" || fail "could not cut the agent's traffic on $1"
}
uncut_all() {
  [[ -s $WORK/cuts ]] || return 0
  local n pid
  while read -r n pid; do
    docker exec "$n" nsenter -t "$pid" -n sh -c \
      'iptables -D INPUT -j E2E-CUT; iptables -D OUTPUT -j E2E-CUT; iptables -F E2E-CUT; iptables -X E2E-CUT' >/dev/null 2>&1 || true
  done <"$WORK/cuts"
  : >"$WORK/cuts"
}

# ---------------------------------------------------------------------------------------
# Chart values.

write_values() { # file host-port mirrored-registries (comma-separated) [more YAML]
  local ep="" r c
  for r in "$PT_REG=$PT_UP:5000" "$HUB_REG=$HUB:6000" "$FLAKY_REG=$FLAKY:6000" "$PRIV_REG=$PRIV_UP:5000" \
    "$OPS_REG=$OPS:6000" "$DASH_REG=$DASH:6000" "$PROM_REG=$PROM:6000"; do
    c=${r#*=}
    ep+="    - \"${r%%=*}=http://$(ip_of "${c%:*}"):${c#*:}\""$'\n'
  done
  cat >"$1" <<EOF
image:
  repository: mirrorlet
  tag: e2e
  pullPolicy: Never
registry:
  hostPort: $2
mirror:
  registries: [$3]
p2p:
  uploadLimit: $UPLOAD_LIMIT
log:
  format: text
extraArgs: ["--peer-read-timeout=1s"]
upstream:
  registries: [$(IFS=,; echo "${PULLED_THROUGH[*]}")]
  endpoints:
$ep  credentialsSecret: regcred
  private: [$PRIV_REG/e2e/pt-secret]
  tagRevalidate: 2s
${4:-}
EOF
}
all_mirrored() { (IFS=,; echo "${MIRRORED[*]}"); }
set_credentials() { # password
  kc create secret docker-registry regcred -n "$NS" --docker-server="$PRIV_REG" \
    --docker-username=alice --docker-password="$1" --dry-run=client -o yaml | kc apply -f - >/dev/null
}
e2e_images() { cargo run -q --release --manifest-path "$ROOT/Cargo.toml" -p mirrorlet-e2e --bin e2e-images -- "$@" >/dev/null; }
make_image() { ARCH=$ARCH "$KIND_DIR/make-image.sh" "$@"; }

# =======================================================================================
# Setup and the chart's lifecycle.

s_setup() {
  log "building images"
  docker build -q -t "$IMAGE" "$ROOT" >/dev/null
  docker build -q -t "$TOOLS" -f "$KIND_DIR/Dockerfile.tools" "$ROOT" >/dev/null
  local extract=mirrorlet-e2e-extract-$$ n r
  track "$extract"
  docker create --name "$extract" "$IMAGE" >/dev/null
  docker cp "$extract:/mirrorlet" "$WORK/mirrorlet"
  docker rm "$extract" >/dev/null
  chmod +x "$WORK/mirrorlet"

  log "cluster"
  kind create cluster --name "$CLUSTER" --config "$KIND_DIR/kind-config.yaml" --wait 180s
  kubectl wait --for=condition=Ready node --all --timeout=180s >/dev/null
  load_nodes
  (( ${#NODES[@]} == 3 )) || fail "the cluster has ${#NODES[@]} nodes, not 3"

  log "registries"
  start_registry "$UPSTREAM" "$PUSH"
  start_registry "$PT_UP" "$PT_PUSH" --cap-add NET_ADMIN
  start_registry "$PRIV_UP" "$PRIV_PUSH" -e USER=alice -e PASSWORD=s3cret
  start_front "$HUB" "$HUB_ADMIN" 1
  start_front "$FLAKY" "$FLAKY_ADMIN" none
  start_front "$OPS" "$OPS_ADMIN" 1
  start_front "$DASH" "$DASH_ADMIN" 1
  start_front "$PROM" "$PROM_ADMIN" 1
  wait_for 30 "the registries" curl -fs -o /dev/null "http://$PUSH/v2/"
  wait_for 30 "the pull-through registry" curl -fs -o /dev/null "http://$PT_PUSH/v2/"
  wait_for 30 "the private registry" code_is_local 401 "http://$PRIV_PUSH/v2/"
  for r in "$HUB_ADMIN" "$FLAKY_ADMIN" "$OPS_ADMIN" "$DASH_ADMIN" "$PROM_ADMIN"; do
    wait_for 30 "the front at $r" curl -fs -o /dev/null "http://$r/admin/stats"
  done

  log "test images"
  e2e_images "$PUSH"
  e2e_images "$PT_PUSH" pullthrough
  e2e_images "$PT_PUSH" hub
  e2e_images "$PRIV_PUSH" private alice:s3cret
  make_image "$PUSH" e2e/nl-configured:v1 700000
  make_image "$PUSH" e2e/p2p-withdrawn:v1 3000000 600000 9000000
  make_image "$PUSH" e2e/p2p-kept:v1 1000000
  make_image "$PUSH" e2e/p2p-corrupt-a:v1 3000000 600000 9000000
  make_image "$PUSH" e2e/p2p-corrupt-b:v1 2000000 500000
  make_image "$PUSH" e2e/upgraded:v1 800000
  make_image "$PUSH" e2e/spool-full:v1 12000000
  make_image "$PUSH" e2e/clients-app:v1 2000000 700000
  make_image "$PT_PUSH" e2e/pt-preheat:v1 3000000 2000000
  make_image "$PT_PUSH" e2e/pt-preheat-b:v1 1000000
  CREDS=alice:s3cret make_image "$PRIV_PUSH" e2e/pt-secret:v1 3000000 1000000
  for r in status dash prom; do
    make_image "$PT_PUSH" "e2e/ops-$r:v1" 2000000 1000000
    make_image "$PT_PUSH" "e2e/ops-$r-other:v1" 500000
  done
  kind load docker-image --name "$CLUSTER" "$IMAGE" "$TOOLS" >/dev/null

  log "the user's own hosts.toml on every node"
  for n in "${NODES[@]}"; do
    for r in "$REG=$UPSTREAM:5000" "docker.io=$UPSTREAM:5000" "$PT_REG=$PT_UP:5000" "$PRIV_REG=$PRIV_UP:5000" \
      "$HUB_REG=$HUB:6000" "$FLAKY_REG=$FLAKY:6000" "$OPS_REG=$OPS:6000" "$DASH_REG=$DASH:6000" "$PROM_REG=$PROM:6000"; do
      user_hosts "$n" "${r%%=*}" "${r#*=}"
    done
    certs_snapshot "$n" >"$WORK/certs-before.$n"
  done
}
code_is_local() { [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$2" || true) == "$1" ]]; }

s_install() {
  local n ip r f hash
  set_credentials s3cret
  write_values "$WORK/values.yaml" "$HOSTPORT" "$(all_mirrored)"
  helm install "$RELEASE" "$CHART" -n "$NS" -f "$WORK/values.yaml" --wait --timeout 5m >/dev/null
  wait_agents
  for n in "${NODES[@]}"; do
    ip=$(node_ip "$n")
    for r in "${MIRRORED[@]}"; do
      f=$(docker exec "$n" cat "$CERTS/$r/hosts.toml") || fail "$n has no $r/hosts.toml"
      [[ $(head -n 1 <<<"$f") == "$MARKER"* ]] || fail "$n: $r/hosts.toml was not written by the init container"
      grep -qF "[host.\"http://$ip:$HOSTPORT\"]" <<<"$f" || fail "$n: $r/hosts.toml does not name the agent at $ip:$HOSTPORT"
      hash=$(docker exec "$n" sha256sum "$CERTS/$r/hosts.toml.mirrorlet-orig" | cut -d' ' -f1) || fail "$n: no backup of the user's $r/hosts.toml"
      grep -qF "$hash  ./$r/hosts.toml" "$WORK/certs-before.$n" || fail "$n: the backup of $r/hosts.toml is not the user's file"
    done
    [[ $(ops_code_try "$n" /readyz) == 200 ]] || fail "$n: /readyz is not 200"
    [[ $(ops_code_try "$n" /livez) == 200 ]] || fail "$n: /livez is not 200"
    [[ $(code_from "$n" "http://$ip:$HOSTPORT/v2/") == 200 ]] || fail "$n: the agent does not answer at its hostPort $ip:$HOSTPORT"
  done
  wait_members
}

s_upgrade() {
  local n ip r f before regs=()
  local -a old
  wait_agents
  mapfile -t old < <(agent_uids)
  for r in "${MIRRORED[@]}"; do [[ $r == docker.io ]] || regs+=("$r"); done
  write_values "$WORK/values-upgrade.yaml" "$HOSTPORT2" "$(IFS=,; echo "${regs[*]}")"
  helm upgrade "$RELEASE" "$CHART" -n "$NS" -f "$WORK/values-upgrade.yaml" --wait --timeout 5m >/dev/null
  wait_replaced "${old[@]}"
  for n in "${NODES[@]}"; do
    ip=$(node_ip "$n")
    # The registry no longer listed: as before install (the user's file, no backup left).
    certs_snapshot "$n" | grep -E '(^| )\./docker\.io(/|$)' >"$WORK/now" || true
    grep -E '(^| )\./docker\.io(/|$)' "$WORK/certs-before.$n" >"$WORK/then" || true
    diff -u "$WORK/then" "$WORK/now" >&3 || fail "$n: docker.io/ is not as before install"
    for r in "${regs[@]}"; do
      f=$(docker exec "$n" cat "$CERTS/$r/hosts.toml") || fail "$n has no $r/hosts.toml"
      grep -qF "[host.\"http://$ip:$HOSTPORT2\"]" <<<"$f" || fail "$n: $r/hosts.toml does not name the agent at port $HOSTPORT2"
      if grep -qF ":$HOSTPORT\"" <<<"$f"; then fail "$n: $r/hosts.toml still names port $HOSTPORT"; fi
    done
    [[ $(code_from "$n" "http://$ip:$HOSTPORT2/v2/") == 200 ]] || fail "$n: the agent does not answer at $ip:$HOSTPORT2"
    [[ $(code_from "$n" "http://$ip:$HOSTPORT/v2/") == 000 ]] || fail "$n: something still answers at the old port $HOSTPORT"
  done
  # Pulls still work: through the agent at its new port...
  registry_up "$UPSTREAM" "$PUSH"
  before=$(metric "$N1" mirrorlet_registry_requests_total status=404)
  rm_image "$N1" "$REG/e2e/upgraded:v1"
  must_pull "$N1" "$REG/e2e/upgraded:v1"
  expect "$N1's containerd asked its agent at port $HOSTPORT2" "$(minus "$(metric "$N1" mirrorlet_registry_requests_total status=404)" "$before")" ">=" 1
  # ...and from the registry no longer mirrored, straight.
  rm_image "$N3" docker.io/library/e2e-hub:1
  must_pull "$N3" docker.io/library/e2e-hub:1
}

release_gone() {
  local left
  left=$(kc get ds,job,pod,svc,sa,role,rolebinding -n "$NS" -l "app.kubernetes.io/instance=$RELEASE" -o name) || return 1
  [[ -z $left ]]
}
s_uninstall() {
  local n out ip p
  # The post-delete hook restores every node before helm returns (its Job waits up to
  # uninstall.timeout, 4m).
  out=$(helm uninstall "$RELEASE" -n "$NS" --wait --timeout 5m 2>&1) || fail "helm uninstall: $out"
  for n in "${NODES[@]}"; do
    certs_snapshot "$n" >"$WORK/now"
    diff -u "$WORK/certs-before.$n" "$WORK/now" >&3 || fail "$n: certs.d is not as before install"
  done
  wait_for 120 "the release's pods and hook objects to be gone" release_gone
  out=$(helm list -n "$NS" -q)
  if grep -qx "$RELEASE" <<<"$out"; then fail "the release is still listed"; fi
  registry_up "$UPSTREAM" "$PUSH"
  rm_image "$N2" "$REG/e2e/multi-layer:v1"
  must_pull "$N2" "$REG/e2e/multi-layer:v1"
  ip=$(node_ip "$N2")
  for p in "$HOSTPORT" "$HOSTPORT2"; do
    [[ $(code_from "$N2" "http://$ip:$p/v2/") == 000 ]] || fail "something still answers at $ip:$p"
  done
}

s_teardown() {
  if [[ ${MIRRORLET_KIND_KEEP:-} == 1 ]]; then
    log "kept (MIRRORLET_KIND_KEEP=1): KUBECONFIG=$WORK/kubeconfig"
    return 0
  fi
  local c left
  kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || fail "kind delete cluster $CLUSTER"
  kind delete cluster --name "$CLUSTER6" --kubeconfig "$WORK/kubeconfig-ipv6" >/dev/null 2>&1 || true
  while read -r c; do docker rm -f "$c" >/dev/null 2>&1 || true; done < <(sort -u "$WORK/containers")
  left=$(kind get clusters 2>/dev/null | grep -xE "$CLUSTER|$CLUSTER6" || true)
  [[ -z $left ]] || fail "clusters left: $left"
  left=$(docker ps -a --filter name=mirrorlet-e2e --format '{{.Names}}')
  [[ -z $left ]] || fail "containers left: $left"
}

# =======================================================================================
# node_local.rs

s_node_local_a() {
  local m b t
  wait_agents
  rm_image "$N1" "$REG/e2e/multi-layer:v1"
  rm_image "$N2" "$REG/e2e/multi-arch:v1"
  m=$(metric "$N1" mirrorlet_registry_requests_total route=manifest status=404 source=upstream-fallthrough)
  b=$(metric "$N1" mirrorlet_registry_requests_total route=blob status=404 source=upstream-fallthrough)
  t=$(metric "$N2" mirrorlet_registry_requests_total status=404)
  must_pull "$N1" "$REG/e2e/multi-layer:v1"
  has_image "$N1" "$REG/e2e/multi-layer:v1" || fail "$N1 does not list the image it pulled"
  ctr_pull "$N2" "$REG/e2e/multi-arch:v1"
  expect "the manifest miss is counted" "$(minus "$(metric "$N1" mirrorlet_registry_requests_total route=manifest status=404 source=upstream-fallthrough)" "$m")" ">=" 1
  expect "config and 4 layers are counted as misses" "$(minus "$(metric "$N1" mirrorlet_registry_requests_total route=blob status=404 source=upstream-fallthrough)" "$b")" ">=" 5
  expect "$N2's misses are counted" "$(minus "$(metric "$N2" mirrorlet_registry_requests_total status=404)" "$t")" ">=" 1
}

s_node_local_b() {
  local arch pinned served d held other url entry repo ns platforms
  wait_agents
  case $(docker exec "$N1" uname -m) in
    x86_64) arch=amd64 ;;
    aarch64) arch=arm64 ;;
    *) fail "unexpected node architecture" ;;
  esac
  pinned=$(manifest_digest "http://$PUSH" e2e/by-digest v1)
  must_pull "$N1" "$REG/e2e/multi-layer:v1"
  must_pull "$N1" "$REG/e2e/multi-arch:v1"
  must_pull "$N1" "$REG/e2e/by-digest@$pinned"
  must_pull "$N1" docker.io/library/e2e-hub:1
  served=$(metric "$N1" mirrorlet_registry_served_bytes_total source=local)

  # Single-platform images by tag, then everything below them by digest.
  for entry in "e2e/multi-layer v1 $REG" "library/e2e-hub 1 docker.io"; do
    read -r repo ref ns <<<"$entry"
    check_manifest "$N1" "$repo" "$ref" "$ns" "$WORK/manifest"
    d=$(sha_of "$WORK/manifest")
    check_manifest "$N1" "$repo" "$d" "$ns" "$WORK/manifest"
    for d in $(jq -r '.config.digest, .layers[].digest' "$WORK/manifest"); do check_blob "$N1" "$repo" "$d" "$ns"; done
  done

  # The multi-platform index: this node's platform is on the node, the other is not.
  check_manifest "$N1" e2e/multi-arch v1 "$REG" "$WORK/index"
  platforms=$(jq -r '[.manifests[].platform | "\(.os)/\(.architecture)"] | sort | join(",")' "$WORK/index")
  [[ $platforms == linux/amd64,linux/arm64 ]] || fail "the index lists $platforms"
  held=$(jq -r --arg a "$arch" '.manifests[] | select(.platform.architecture == $a) | .digest' "$WORK/index")
  other=$(jq -r --arg a "$arch" '.manifests[] | select(.platform.architecture != $a) | .digest' "$WORK/index")
  check_manifest "$N1" e2e/multi-arch "$held" "$REG" "$WORK/manifest"
  for d in $(jq -r '.config.digest, .layers[].digest' "$WORK/manifest"); do check_blob "$N1" e2e/multi-arch "$d" "$REG"; done
  url="$(agent_url "$N1")/v2/e2e/multi-arch/manifests/$other?ns=$REG"
  [[ $(code_from "$PROBE" "$url") == 404 ]] || fail "the other platform's manifest, never pulled here, is served: $url"

  # Pulled by digest only: served by digest; its tag is not on the node.
  check_manifest "$N1" e2e/by-digest "$pinned" "$REG" "$WORK/manifest"
  for d in $(jq -r '.config.digest, .layers[].digest' "$WORK/manifest"); do check_blob "$N1" e2e/by-digest "$d" "$REG"; done
  url="$(agent_url "$N1")/v2/e2e/by-digest/manifests/v1?ns=$REG"
  [[ $(code_from "$PROBE" "$url") == 404 ]] || fail "the tag of an image pulled by digest is served: $url"

  # No ns parameter means Docker Hub, with library/ added (Docker's registry-mirrors use).
  url="$(agent_url "$N1")/v2/e2e-hub/manifests/1"
  node_fetch "$WORK/got" GET "$url"
  [[ $(<"$WORK/got.code") == 200 ]] || fail "/v2/e2e-hub/manifests/1 without ns: status $(<"$WORK/got.code")"
  [[ $(hdr "$WORK/got.head" content-type) == application/vnd.docker.distribution.manifest.v2+json ]] \
    || fail "/v2/e2e-hub/manifests/1 without ns: Content-Type $(hdr "$WORK/got.head" content-type)"
  expect "bytes served locally are counted" "$(minus "$(metric "$N1" mirrorlet_registry_served_bytes_total source=local)" "$served")" ">" 4000000
}

s_node_local_c() {
  local n r2 r3 cid2 pid3 t0 took code ip
  wait_agents
  for n in "$N2" "$N3"; do
    rm_image "$n" "$REG/e2e/multi-layer:v1"
    rm_image "$n" "$REG/e2e/multi-arch:v1"
  done
  r2=$(agent_restarts "$N2")
  r3=$(agent_restarts "$N3")
  cid2=$(agent_cid "$N2")
  pid3=$(agent_pid "$N3")
  # With the kubelet stopped nothing restarts the agents until the pulls are done.
  stop_service "$N2" kubelet
  stop_service "$N3" kubelet
  # Node 2: stopped (SIGTERM; crictl sends SIGKILL only after the chart's 30 s grace period).
  t0=$SECONDS
  docker exec "$N2" crictl stop --timeout 30 "$cid2" >/dev/null
  took=$((SECONDS - t0))
  code=$(docker exec "$N2" crictl inspect "$cid2" | jq -r '.status.exitCode // 0')
  { ((took < 30)) && [[ $code != 137 ]]; } || fail "the agent on $N2 did not exit on SIGTERM within its grace period (${took}s, exit status $code)"
  # Node 3: killed.
  docker exec "$N3" sh -c "kill -KILL $pid3"
  wait_for 10 "the agent on $N3 to die" gone "$N3" "$pid3"
  for n in "$N2" "$N3"; do
    ip=$(node_ip "$n")
    [[ $(code_from "$n" "http://$ip:$HOSTPORT/v2/") == 000 ]] || fail "something still answers at $n's hostPort"
    must_pull "$n" "$REG/e2e/multi-layer:v1"
    ctr_pull "$n" "$REG/e2e/multi-arch:v1"
  done
  start_services
  wait_for 240 "the agent on $N2 to be restarted and ready" agent_ready "$N2" "" "$((r2 + 1))"
  wait_for 240 "the agent on $N3 to be restarted and ready" agent_ready "$N3" "" "$((r3 + 1))"
}

s_node_local_d() {
  local n=$N2 ip want hosts s m u pid uid before regs
  wait_agents
  ip=$(node_ip "$n")
  docker cp "$WORK/mirrorlet" "$n:/usr/local/bin/mirrorlet"
  # The node was configured at install; cleanup first gives the user's own files back.
  docker exec "$n" mirrorlet cleanup --config-path "$CERTS" >/dev/null 2>&1 || fail "mirrorlet cleanup failed on $n"
  certs_snapshot "$n" >"$WORK/now"
  diff -u "$WORK/certs-before.$n" "$WORK/now" >&3 || fail "cleanup did not give back the user's certs.d"
  want=$(printf '# upstream for the e2e cluster\nserver = "http://%s"\n\n[host."http://%s"]\n  capabilities = ["pull", "resolve"]' "$UPSTREAM:5000" "$UPSTREAM:5000")
  [[ $(docker exec "$n" cat "$CERTS/$REG/hosts.toml") == "$want" ]] || fail "$REG/hosts.toml is not the user's"

  # Configure with the default registry list plus the test registry, twice: same bytes.
  regs="docker.io,ghcr.io,quay.io,registry.k8s.io,mcr.microsoft.com,public.ecr.aws,gcr.io,_default,$REG"
  docker exec "$n" mirrorlet configure --config-path "$CERTS" --registries "$regs" --mirror-url "http://$ip:$HOSTPORT" >/dev/null 2>&1 \
    || fail "mirrorlet configure failed on $n"
  certs_snapshot "$n" >"$WORK/once"
  docker exec "$n" mirrorlet configure --config-path "$CERTS" --registries "$regs" --mirror-url "http://$ip:$HOSTPORT" >/dev/null 2>&1 \
    || fail "mirrorlet configure failed on $n the second time"
  certs_snapshot "$n" >"$WORK/twice"
  diff -u "$WORK/once" "$WORK/twice" >&3 || fail "configuring twice changed certs.d"
  hosts=$(docker exec "$n" cat "$CERTS/$REG/hosts.toml")
  s=$(line_of "server = \"http://$UPSTREAM:5000\"" <<<"$hosts")
  m=$(line_of "[host.\"http://$ip:$HOSTPORT\"]" <<<"$hosts")
  u=$(line_of "[host.\"http://$UPSTREAM:5000\"]" <<<"$hosts")
  { [[ -n $s && -n $m && -n $u ]] && ((s < m && m < u)); } || fail "server, the agent, then the user's host expected in:"$'\n'"$hosts"
  for s in ghcr.io _default; do
    docker exec "$n" test -f "$CERTS/$s/hosts.toml" || fail "no $s/hosts.toml after configure"
  done

  # containerd accepts the written configuration: a pull goes through the agent's miss path.
  before=$(metric "$n" mirrorlet_registry_requests_total status=404)
  rm_image "$n" "$REG/e2e/nl-configured:v1"
  must_pull "$n" "$REG/e2e/nl-configured:v1"
  expect "the pull went through the agent" "$(minus "$(metric "$n" mirrorlet_registry_requests_total status=404)" "$before")" ">=" 1

  # The chart's uninstall DaemonSet: cleanup --hold restores, then holds until terminated.
  pid=$(docker exec "$n" sh -c "mirrorlet cleanup --config-path $CERTS --hold true >/tmp/cleanup-hold.log 2>&1 & echo \$!")
  wait_for 10 "cleanup --hold to restore certs.d" snapshot_is "$n" "$WORK/certs-before.$n"
  sleep 0.3
  alive "$n" "$pid" || fail "cleanup --hold did not hold: $(docker exec "$n" tail -n 5 /tmp/cleanup-hold.log)"
  docker exec "$n" sh -c "kill -TERM $pid"
  wait_for 5 "cleanup --hold to exit on SIGTERM" gone "$n" "$pid"
  rm_image "$n" "$REG/e2e/nl-configured:v1"
  ctr_pull "$n" "$REG/e2e/nl-configured:v1"

  # Back to the chart: a new agent pod, whose init container configures the node again.
  uid=$(agent_uid "$n")
  kc delete pod -n "$NS" "$(agent_pod "$n")" --wait=false >/dev/null
  wait_for 240 "a new agent pod on $n" agent_ready "$n" "$uid"
  [[ $(docker exec "$n" head -n 1 "$CERTS/$REG/hosts.toml") == "$MARKER"* ]] || fail "the new pod did not configure $n"
  docker exec "$n" rm -f /usr/local/bin/mirrorlet
}

line_of() { awk -v p="$1" 'index($0, p) { print NR; exit }'; } # the first line containing $1

# Waits until NODE's agent counts as many images as its containerd lists; prints the count.
inventory_in_step() {
  local listed counted deadline=$((SECONDS + 20))
  while :; do
    listed=$(docker exec "$1" ctr -n k8s.io images ls -q | grep -c .) || listed=0
    counted=$(metric "$1" mirrorlet_store_images)
    if holds "$counted" "==" "$listed"; then
      printf '%s\n' "$counted"
      return 0
    fi
    ((SECONDS < deadline)) || fail "$1: the agent counts $counted images, containerd lists $listed"
    sleep 0.2
  done
}

s_node_local_e() {
  local n=$N2 url uid restarts pid pod before after
  wait_agents
  must_pull "$n" "$REG/e2e/multi-layer:v1"
  rm_image "$n" "$REG/e2e/multi-arch:v1"
  url="$(agent_url "$n")/v2/e2e/multi-layer/manifests/v1?ns=$REG"
  [[ $(code_from "$PROBE" "$url") == 200 ]] || fail "$url is not served"
  # Serving reads containerd directly; the inventory follows its events a moment later.
  before=$(inventory_in_step "$n")
  pod=$(agent_pod "$n")
  uid=$(agent_uid "$n")
  restarts=$(agent_restarts "$n")
  pid=$(agent_pid "$n")
  stop_service "$n" containerd
  sleep 1.5 # several failed reconnection attempts
  [[ $(ops_code_try "$n" /readyz) == 503 ]] || fail "/readyz is not 503 without containerd"
  [[ $(code_from "$PROBE" "$url") == 404 ]] || fail "does not fall through (404) while containerd is down"
  alive "$n" "$pid" || fail "the agent stopped with containerd"
  start_services
  wait_for 30 "the agent on $n to be ready again" ops_code_is "$n" /readyz 200
  [[ $(code_from "$PROBE" "$url") == 200 ]] || fail "does not serve again after containerd's restart"
  # The event feed resumed: a new image shows up in the agent's inventory.
  must_pull "$n" "$REG/e2e/multi-arch:v1"
  after=$(inventory_in_step "$n")
  expect "the image pulled after the restart is counted" "$after" ">" "$before"
  [[ $(agent_uid "$n") == "$uid" ]] || fail "the agent pod was replaced"
  [[ $(agent_restarts "$n") == "$restarts" ]] || fail "the agent container was restarted"
  alive "$n" "$pid" || fail "the agent process is not the one from before the restart"
  kc logs -n "$NS" "$pod" -c mirrorlet --tail=-1 >"$WORK/agent.log"
  grep -q reconnected "$WORK/agent.log" || fail "the agent does not log the reconnection: $(tail_of "$WORK/agent.log" 800)"
}

# =======================================================================================
# p2p.rs (pull-through is off for REG: the agents never fetch it themselves)

head_code() { local url; url=$(agent_url "$1"); code_from "$PROBE" -I "$url/v2/$2/manifests/$3?ns=$REG"; }
servable() { # node repo reference [registry, default REG]
  local ip
  ip=$(agent_ip_try "$1") || return 1
  [[ $(code_from "$PROBE" -I "http://$(url_host "$ip"):$REG_PORT/v2/$2/manifests/$3?ns=${4:-$REG}") == 2* ]]
}
wait_servable() { wait_for 20 "$2:$3 to be servable at $1" servable "$@"; }
head_is() { # code node repo reference
  local ip
  ip=$(agent_ip_try "$2") || return 1
  [[ $(code_from "$PROBE" -I "http://$(url_host "$ip"):$REG_PORT/v2/$3/manifests/$4?ns=$REG") == "$1" ]]
}

s_p2p_a() {
  local img=$REG/e2e/p2p-app:v1 digest n s1 s2 p2 p3 f2 f3 d1 d2
  wait_agents
  wait_members
  registry_up "$UPSTREAM" "$PUSH"
  for n in "${NODES[@]}"; do rm_image "$n" "$img"; done
  digest=$(manifest_digest "http://$PUSH" e2e/p2p-app v1)
  s1=$(metric "$N1" mirrorlet_registry_peer_served_bytes_total)
  s2=$(metric "$N2" mirrorlet_registry_peer_served_bytes_total)
  p2=$(metric "$N2" mirrorlet_registry_served_bytes_total source=peer)
  p3=$(metric "$N3" mirrorlet_registry_served_bytes_total source=peer)
  f2=$(metric "$N2" mirrorlet_lookup_duration_seconds_count outcome=found)
  f3=$(metric "$N3" mirrorlet_lookup_duration_seconds_count outcome=found)
  must_pull "$N1" "$img"
  registry_down "$UPSTREAM"
  wait_servable "$N2" e2e/p2p-app v1
  must_pull "$N2" "$img"
  must_pull "$N3" "$REG/e2e/p2p-app@$digest"
  # Node 1 served at least one whole copy; node 3 may have taken parts from node 2.
  d1=$(minus "$(metric "$N1" mirrorlet_registry_peer_served_bytes_total)" "$s1")
  d2=$(minus "$(metric "$N2" mirrorlet_registry_peer_served_bytes_total)" "$s2")
  expect "node 1 served the layers" "$d1" ">=" 12600000
  expect "two copies went node to node" "$(plus "$d1" "$d2")" ">=" 25200000
  expect "node 2 got its layers from a peer" "$(minus "$(metric "$N2" mirrorlet_registry_served_bytes_total source=peer)" "$p2")" ">=" 12600000
  expect "node 3 got its layers from a peer" "$(minus "$(metric "$N3" mirrorlet_registry_served_bytes_total source=peer)" "$p3")" ">=" 12600000
  expect "node 2 found peers by lookup" "$(minus "$(metric "$N2" mirrorlet_lookup_duration_seconds_count outcome=found)" "$f2")" ">=" 4
  expect "node 3 found peers by lookup" "$(minus "$(metric "$N3" mirrorlet_lookup_duration_seconds_count outcome=found)" "$f3")" ">=" 4
}

s_p2p_b() {
  local misses rc=0
  wait_agents
  registry_down "$UPSTREAM"
  misses=$(metric "$N2" mirrorlet_registry_requests_total source=upstream-fallthrough)
  pull "$N2" "$REG/e2e/nobody-has-this:v1" 5 || rc=$?
  ((rc != 0)) || fail "an image nobody has was pulled"
  ((rc != 124)) || fail "the pull hung (no answer within 5 s)"
  grep -qiE 'connection refused|not found' "$WORK/pull.err.$N2" || fail "no clear error: $(tail_of "$WORK/pull.err.$N2")"
  log "failed: $(tail_of "$WORK/pull.err.$N2" 200)"
  expect "the miss is counted" "$(minus "$(metric "$N2" mirrorlet_registry_requests_total source=upstream-fallthrough)" "$misses")" ">=" 1
}

s_p2p_c() {
  local img=$REG/e2e/p2p-withdrawn:v1 kept=$REG/e2e/p2p-kept:v1 digest kdigest n w
  wait_agents
  wait_members
  registry_up "$UPSTREAM" "$PUSH"
  digest=$(manifest_digest "http://$PUSH" e2e/p2p-withdrawn v1)
  kdigest=$(manifest_digest "http://$PUSH" e2e/p2p-kept v1)
  # Node 1 alone holds the image; node 3 alone holds another, to show lookups still work.
  for n in "$N2" "$N3"; do
    rm_image "$n" "$img"
    if has_image "$n" "$img"; then fail "$n holds $img: node 1 must be its only holder"; fi
  done
  rm_image "$N2" "$kept"
  must_pull "$N1" "$img"
  must_pull "$N3" "$kept"
  wait_servable "$N2" e2e/p2p-withdrawn v1
  wait_servable "$N2" e2e/p2p-kept v1
  [[ $(head_code "$N2" e2e/p2p-withdrawn "$digest") == 200 ]] || fail "node 2 does not find the image at node 1"
  w=$(plus "$(metric "$N2" mirrorlet_p2p_withdrawals_received_total)" "$(metric "$N3" mirrorlet_p2p_withdrawals_received_total)")

  # Delete the image on node 1; containerd's garbage collection removes its content.
  rm_image "$N1" "$img"
  docker exec "$N1" ctr -n k8s.io images rm "$REG/e2e/p2p-withdrawn@$digest" >/dev/null 2>&1 || true
  wait_for 15 "the content to be garbage-collected on $N1" content_gone "$N1" "$digest"
  wait_for 20 "lookups at node 2 to stop returning node 1" head_is 404 "$N2" e2e/p2p-withdrawn "$digest"
  expect "node 1 told its peers to forget it" \
    "$(minus "$(plus "$(metric "$N2" mirrorlet_p2p_withdrawals_received_total)" "$(metric "$N3" mirrorlet_p2p_withdrawals_received_total)")" "$w")" ">=" 1
  [[ $(head_code "$N3" e2e/p2p-withdrawn "$digest") == 404 ]] || fail "node 3 still finds the withdrawn image"
  [[ $(head_code "$N2" e2e/p2p-kept "$kdigest") == 200 ]] || fail "node 2 no longer finds node 3's image: lookups broke"
}

# The big image on nodes 1 and 3 (not 2), upstream stopped, servable at node 2.
big_on_nodes_1_and_3() {
  local img=$REG/e2e/big:v1
  if ! has_image "$N1" "$img" || ! has_image "$N3" "$img"; then
    registry_up "$UPSTREAM" "$PUSH"
    must_pull "$N1" "$img" 600
    must_pull "$N3" "$img" 600
  fi
  rm_image "$N2" "$img"
  registry_down "$UPSTREAM"
  wait_servable "$N2" e2e/big v1
}

# Starts node 2's pull of the big image (PULL: its background job) and waits until node 1
# or 3 has served it 32 MiB since; sets SERVING, OTHER and OTHER_BEFORE (what OTHER had
# served before the pull).
PULL="" SERVING="" OTHER="" OTHER_BEFORE=""
pull_and_catch_server() {
  local ip1 ip3 b1 b3 s1 s3 deadline
  ip1=$(agent_ip "$N1")
  ip3=$(agent_ip "$N3")
  b1=$(metric "$N1" mirrorlet_registry_peer_served_bytes_total)
  b3=$(metric "$N3" mirrorlet_registry_peer_served_bytes_total)
  bg pull "$N2" "$REG/e2e/big:v1" 600
  PULL=$!
  deadline=$((SECONDS + 60))
  while :; do
    s1=$(ops_ip_try "$ip1" /metrics | sum_samples mirrorlet_registry_peer_served_bytes_total) || s1=$b1
    s3=$(ops_ip_try "$ip3" /metrics | sum_samples mirrorlet_registry_peer_served_bytes_total) || s3=$b3
    if holds "$(minus "$s1" "$b1")" ">=" 33554432; then SERVING=$N1 OTHER=$N3 OTHER_BEFORE=$b3; return 0; fi
    if holds "$(minus "$s3" "$b3")" ">=" 33554432; then SERVING=$N3 OTHER=$N1 OTHER_BEFORE=$b1; return 0; fi
    kill -0 "$PULL" 2>/dev/null || fail "node 2's pull ended before it could be interrupted: $(tail_of "$WORK/pull.err.$N2")"
    ((SECONDS < deadline)) || fail "node 2 never streamed from a peer"
    sleep 0.05
  done
}

s_p2p_d() {
  local pid1 pid3 pid r1 r3 restarts resumes
  wait_agents
  wait_members
  big_on_nodes_1_and_3
  pid1=$(agent_pid "$N1")
  pid3=$(agent_pid "$N3")
  r1=$(agent_restarts "$N1")
  r3=$(agent_restarts "$N3")
  resumes=$(metric "$N2" mirrorlet_peer_resumes_total)
  pull_and_catch_server
  if [[ $SERVING == "$N1" ]]; then pid=$pid1 restarts=$r1; else pid=$pid3 restarts=$r3; fi
  # SIGKILL: the transfer is cut mid-stream, with no graceful end.
  docker exec "$SERVING" sh -c "kill -KILL $pid"
  wait "$PULL" || fail "node 2's pull failed after the serving agent was killed: $(tail_of "$WORK/pull.err.$N2")"
  expect "node 2's agent continued the blob elsewhere" "$(minus "$(metric "$N2" mirrorlet_peer_resumes_total)" "$resumes")" ">=" 1
  expect "$OTHER served the rest" "$(minus "$(metric "$OTHER" mirrorlet_registry_peer_served_bytes_total)" "$OTHER_BEFORE")" ">" 0
  wait_for 240 "the killed agent on $SERVING to be restarted and ready" agent_ready "$SERVING" "" "$((restarts + 1))"
}

s_p2p_e() {
  local a=e2e/p2p-corrupt-a b=e2e/p2p-corrupt-b up n da db m2 m3 d
  local -a blobs_a blobs_b
  wait_agents
  wait_members
  registry_up "$UPSTREAM" "$PUSH"
  for n in "${NODES[@]}"; do rm_image "$n" "$REG/$a:v1"; rm_image "$n" "$REG/$b:v1"; done
  up=$(ip_of "$UPSTREAM")
  da=$(manifest_digest "http://$PUSH" "$a" v1)
  db=$(manifest_digest "http://$PUSH" "$b" v1)
  mapfile -t blobs_a < <(blob_digests "http://$PUSH" "$a" "$da")
  mapfile -t blobs_b < <(blob_digests "http://$PUSH" "$b" "$db")
  ((${#blobs_a[@]} == 4 && ${#blobs_b[@]} == 3)) || fail "unexpected blobs: ${blobs_a[*]} / ${blobs_b[*]}"

  # A peer that corrupts only the 9 MB layer of an image nobody holds: node 2's agent
  # streams it to containerd (--peer-verify stream) holding back the last byte, finds the
  # mismatch, cuts the stream and aborts containerd's partial download; that pull fails,
  # and the retry starts clean, avoids the peer and completes.
  local ab2 attempts
  m2=$(metric "$N2" mirrorlet_peer_digest_mismatches_total)
  ab2=$(metric "$N2" mirrorlet_ingests_aborted_total)
  start_corrupt_peer corrupt-peer-a 5000000 "$up" "$a" "${blobs_a[@]}"
  attempts=$(pull_with_retries "$N2" "$REG/$a:v1")
  ((attempts <= 2)) || fail "node 2's retry did not complete ($attempts attempts)"
  expect "the corrupt layer was detected" "$(minus "$(metric "$N2" mirrorlet_peer_digest_mismatches_total)" "$m2")" "==" 1
  expect "containerd's partial copy was aborted" "$(minus "$(metric "$N2" mirrorlet_ingests_aborted_total)" "$ab2")" ">=" 1
  stop_corrupt_peer corrupt-peer-a

  # A peer that corrupts every blob of another image (nobody else holds it): node 3's first
  # blob from it fails verification in memory, and the peer is avoided from then on.
  m3=$(metric "$N3" mirrorlet_peer_digest_mismatches_total)
  start_corrupt_peer corrupt-peer-b 0 "$up" "$b" "${blobs_b[@]}"
  [[ $(pull_with_retries "$N3" "$REG/$b:v1") == 1 ]] || fail "node 3's first pull did not complete"
  expect "the corrupt bytes were detected" "$(minus "$(metric "$N3" mirrorlet_peer_digest_mismatches_total)" "$m3")" ">=" 1
  stop_corrupt_peer corrupt-peer-b

  # containerd commits content only under its verified digest: every blob is there.
  for d in "${blobs_a[@]}"; do content_has "$N2" "$d" || fail "$N2: $d is not stored"; done
  for d in "${blobs_b[@]}"; do content_has "$N3" "$d" || fail "$N3: $d is not stored"; done
}
start_corrupt_peer() { # name min-size registry-ip repo digest...
  local name=$1 min=$2 ip=$3 repo=$4 urls="" d
  shift 4
  for d in "$@"; do urls+="\"http://$ip:5000/v2/$repo/blobs/$d\", "; done
  sed -e "s|PEER_NAME|$name|" -e "s|\"MIN_SIZE\"|\"$min\"|" -e "s|BLOB_URLS|${urls%, }|" "$KIND_DIR/corrupt-peer.yaml" \
    | kc apply -n "$NS" -f - >/dev/null
  wait_for 60 "$name to advertise" pod_log_has "$name" advertised
}
pod_log_has() { local l; l=$(kc logs -n "$NS" "$1" 2>/dev/null) || return 1; grep -q "$2" <<<"$l"; }
pod_gone() { local left; left=$(kc get pod -n "$NS" "$1" --ignore-not-found -o name) || return 1; [[ -z $left ]]; }
stop_corrupt_peer() {
  kc delete pod -n "$NS" "$1" --grace-period=0 --force --wait=false >/dev/null 2>&1 || true
  wait_for 60 "$1 to be gone" pod_gone "$1"
}
pull_with_retries() { # node image: pulls like kubelet (three attempts); prints the attempt that worked
  local i
  for i in 1 2 3; do
    if pull "$1" "$2"; then
      echo "$i"
      return 0
    fi
    log "$1: pull attempt $i failed: $(tail_of "$WORK/pull.err.$1" 200)"
    sleep 2 # the kubelet backs off too; an immediate retry can race containerd's clean-up
  done
  fail "$1: the pull of $2 never completed"
}

s_p2p_f() {
  local pid1 pid3 resumes
  wait_agents
  wait_members
  big_on_nodes_1_and_3
  pid1=$(agent_pid "$N1")
  pid3=$(agent_pid "$N3")
  resumes=$(metric "$N2" mirrorlet_peer_resumes_total)
  pull_and_catch_server
  if [[ $SERVING == "$N1" ]]; then cut_agent "$N1" "$pid1"; else cut_agent "$N3" "$pid3"; fi
  wait "$PULL" || fail "node 2's pull failed after $SERVING's link was cut: $(tail_of "$WORK/pull.err.$N2")"
  uncut_all
  expect "node 2's agent continued the blob elsewhere" "$(minus "$(metric "$N2" mirrorlet_peer_resumes_total)" "$resumes")" ">=" 1
}

# =======================================================================================
# pullthrough.rs

s_pullthrough_a() {
  local repo=e2e/pt-burst manifest n mark served others
  local -a blobs
  wait_agents
  wait_members
  registry_up "$PT_UP" "$PT_PUSH"
  for n in "${NODES[@]}"; do rm_image "$n" "$PT_REG/$repo:v1"; done
  manifest=$(manifest_digest "http://$PT_PUSH" "$repo" v1)
  mapfile -t blobs < <(blob_digests "http://$PT_PUSH" "$repo" "$manifest")
  served=$(sum_metric mirrorlet_registry_served_bytes_total source=upstream)
  mark=$(log_mark "$PT_UP")
  pull_all "$PT_REG/$repo:v1"
  log_since "$PT_UP" "$mark" >"$WORK/log"
  content_gets <"$WORK/log" >"$WORK/gets"
  for n in "$manifest" "${blobs[@]}"; do
    [[ $(count_ending "$n" <"$WORK/gets") == 1 ]] || fail "$n fetched $(count_ending "$n" <"$WORK/gets") times: $(cut -f2,3,6 "$WORK/log" | tr '\n' ' ')"
  done
  [[ $(wc -l <"$WORK/gets") == $((1 + ${#blobs[@]})) ]] || fail "something else was fetched: $(cut -f2,3 "$WORK/gets" | tr '\n' ' ')"
  others=$(awk -F'\t' '$6 !~ /^mirrorlet\//' "$WORK/log")
  [[ -z $others ]] || fail "containerd went upstream itself: $(head -n 5 <<<"$others" | tr '\n' ' ')"
  log "upstream saw $(wc -l <"$WORK/log") requests: $(wc -l <"$WORK/gets") content GETs, $(awk -F'\t' '$2 == "HEAD"' "$WORK/log" | wc -l) HEADs"
  expect "bytes served from upstream are counted" "$(minus "$(sum_metric mirrorlet_registry_served_bytes_total source=upstream)" "$served")" ">" 0
}

s_pullthrough_b() {
  local img=$PT_REG/e2e/pt-owner-dies:v1 i n owner="" deadline v resumed=0
  local -a received resumes restarts pids agent_pids ips
  wait_agents
  wait_members
  registry_up "$PT_UP" "$PT_PUSH"
  for i in "${!NODES[@]}"; do
    n=${NODES[i]}
    rm_image "$n" "$img"
    received[i]=$(metric "$n" mirrorlet_upstream_received_bytes_total)
    resumes[i]=$(metric "$n" mirrorlet_peer_resumes_total)
    restarts[i]=$(agent_restarts "$n")
    agent_pids[i]=$(agent_pid "$n")
    ips[i]=$(agent_ip "$n")
  done
  # A realistic upstream: the 160 MiB layer takes seconds to come.
  tc_cap "$PT_UP" 300mbit
  for n in "${NODES[@]}"; do
    bg pull "$n" "$img" 600
    pids+=($!)
  done
  # The owner of the layer is the agent downloading it.
  deadline=$((SECONDS + 60))
  while [[ -z $owner ]]; do
    for i in "${!NODES[@]}"; do
      v=$(ops_ip_try "${ips[i]}" /metrics | sum_samples mirrorlet_upstream_received_bytes_total) || continue
      if holds "$(minus "$v" "${received[i]}")" ">=" 33554432; then owner=$i; break; fi
    done
    [[ -n $owner ]] || ((SECONDS < deadline)) || fail "no agent downloaded the layer"
    [[ -n $owner ]] || sleep 0.2
  done
  docker exec "${NODES[owner]}" sh -c "kill -KILL ${agent_pids[owner]}"
  for i in "${!NODES[@]}"; do
    wait "${pids[i]}" || fail "${NODES[i]} could not pull despite the dead owner: $(tail_of "$WORK/pull.err.${NODES[i]}")"
  done
  tc_uncap "$PT_UP"
  for i in "${!NODES[@]}"; do
    ((i == owner)) && continue
    resumed=$(plus "$resumed" "$(minus "$(metric "${NODES[i]}" mirrorlet_peer_resumes_total)" "${resumes[i]}")")
  done
  expect "the followers continued the layer elsewhere" "$resumed" ">=" 1
  wait_for 240 "the killed owner on ${NODES[owner]} to be restarted and ready" agent_ready "${NODES[owner]}" "" "$((restarts[owner] + 1))"
}

s_pullthrough_c() {
  local img=$HUB_REG/e2e/pt-hub:v1 n limited=0 rl rem lim
  local -a pids=()
  wait_agents
  wait_members
  registry_up "$PT_UP" "$PT_PUSH"
  # All but the last node pull at once.
  for n in "$N1" "$N2"; do
    bg pull "$n" "$img"
    pids+=($!)
  done
  wait "${pids[0]}" || fail "$N1 could not pull: $(tail_of "$WORK/pull.err.$N1")"
  wait "${pids[1]}" || fail "$N2 could not pull: $(tail_of "$WORK/pull.err.$N2")"
  log "front after the burst: $(curl -fsS "http://$HUB_ADMIN/admin/stats")"
  [[ $(front_stat "$HUB_ADMIN" manifest_gets) == 1 ]] || fail "not one counted pull for the cluster"
  [[ $(front_stat "$HUB_ADMIN" rejected) == 0 ]] || fail "the front answered 429"
  [[ $(front_stat "$HUB_ADMIN" blob_redirects) == 3 ]] || fail "blobs were not fetched once each, through the CDN"
  [[ $(front_stat "$HUB_ADMIN" cdn_with_auth) == 0 ]] || fail "credentials went to the CDN"
  expect "the agents used tokens" "$(front_stat "$HUB_ADMIN" tokens)" ">=" 1
  # The budget is spent: the last node still starts its pod, from the cluster.
  must_pull "$N3" "$img"
  [[ $(front_stat "$HUB_ADMIN" manifest_gets) == 1 && $(front_stat "$HUB_ADMIN" rejected) == 0 ]] \
    || fail "the last node's pull cost a counted pull"
  # An image nobody has cannot come: the 429 is seen, counted, and the pull fails cleanly.
  must_fail_pull "$N1" "$HUB_REG/e2e/pt-hub-other:v1" 60 "over the limit"
  for n in "${NODES[@]}"; do
    rl=$(metric "$n" mirrorlet_upstream_rate_limited_total "registry=$HUB_REG")
    holds "$rl" ">=" 1 || continue
    limited=$((limited + 1))
    # The 429 carried the registry's budget.
    rem=$(metric "$n" mirrorlet_upstream_ratelimit_remaining "registry=$HUB_REG")
    lim=$(metric "$n" mirrorlet_upstream_ratelimit_limit "registry=$HUB_REG")
    { holds "$rem" "==" 0 && holds "$lim" "==" 1; } || fail "$n: rate limit remaining $rem of $lim, want 0 of 1"
  done
  ((limited >= 1)) || fail "the 429 was not counted"
}

s_pullthrough_d() {
  local -a old
  wait_agents
  wait_members
  # containerd has no credentials for the registry: only the agents' can get it.
  pull_all "$PRIV_REG/e2e/pt-private:v1"
  # The agents get a wrong password: the refusal is logged clearly, and containerd's own
  # attempt with the pod's pull secret still works.
  set_credentials wrong
  mapfile -t old < <(agent_uids)
  kc rollout restart "ds/$RELEASE" -n "$NS" >/dev/null
  wait_replaced "${old[@]}"
  wait_members
  must_fail_pull "$N1" "$PRIV_REG/e2e/pt-private-2:v1" 60 "no one has credentials that work"
  docker exec "$N2" timeout 300 crictl pull --creds alice:s3cret "$PRIV_REG/e2e/pt-private-2:v1" >/dev/null 2>"$WORK/pull.err.$N2" \
    || fail "containerd could not pull with the pod's own pull secret: $(tail_of "$WORK/pull.err.$N2")"
  kc logs -n "$NS" -l "$AGENTS" -c mirrorlet --tail=-1 >"$WORK/agents.log"
  grep -q "refused the configured credentials" "$WORK/agents.log" || fail "no clear log line about the wrong password"
  set_credentials s3cret # for pods started later
}

# The agents hold working credentials for PRIV_REG (regcred), yet its e2e/pt-secret
# repository is private: a node without the pod's pull secret cannot get it through them;
# nodes with it resolve the tag at the registry and take the layers from a peer.
s_pullthrough_k() {
  local img=$PRIV_REG/e2e/pt-secret:v1 n p2 r3
  wait_agents
  wait_members
  for n in "${NODES[@]}"; do rm_image "$n" "$img"; done
  p2=$(metric "$N2" mirrorlet_registry_served_bytes_total source=peer)
  r3=$(metric "$N3" mirrorlet_registry_private_tags_refused_total)
  for n in "$N1" "$N2"; do
    docker exec "$n" timeout 300 crictl pull --creds alice:s3cret "$img" >/dev/null 2>"$WORK/pull.err.$n" \
      || fail "$n could not pull with the pull secret: $(tail_of "$WORK/pull.err.$n")"
  done
  expect "node 2 got its layers from node 1" "$(minus "$(metric "$N2" mirrorlet_registry_served_bytes_total source=peer)" "$p2")" ">=" 4000000
  must_fail_pull "$N3" "$img" 60 "no pull secret, no image, whatever the agents' credentials"
  expect "node 3's agent refused the tag" "$(minus "$(metric "$N3" mirrorlet_registry_private_tags_refused_total)" "$r3")" ">=" 1
}

s_pullthrough_e() {
  local repo=e2e/pt-moving n old new listed
  wait_agents
  wait_members
  registry_up "$PT_UP" "$PT_PUSH"
  for n in "${NODES[@]}"; do rm_image "$n" "$PT_REG/$repo:stable"; done
  pull_all "$PT_REG/$repo:stable"
  old=$(manifest_digest "http://$PT_PUSH" "$repo" stable)
  # Another image pushed under the same tag.
  e2e_images "$PT_PUSH" moved
  new=$(manifest_digest "http://$PT_PUSH" "$repo" stable)
  [[ $old != "$new" ]] || fail "the tag did not move upstream"
  sleep 3 # past the revalidation window (2 s in this suite)
  pull_all "$PT_REG/$repo:stable"
  for n in "${NODES[@]}"; do
    listed=$(docker exec "$n" ctr -n k8s.io images ls "name==$PT_REG/$repo:stable")
    grep -qF "$new" <<<"$listed" || fail "$n does not have the new digest $new: $listed"
  done
}

first_bytes() { local s; s=$(docker exec "$1" stat -c %s /tmp/e2e-flowing 2>/dev/null) || return 1; ((s > 0)); }
s_pullthrough_g() {
  local repo=e2e/pt-flowing manifest layer size url before fetched curl_job n
  wait_agents
  wait_members
  registry_up "$PT_UP" "$PT_PUSH"
  for n in "${NODES[@]}"; do rm_image "$n" "$PT_REG/$repo:v1"; done
  manifest=$(manifest_body "http://$PT_PUSH" "$repo" v1)
  layer=$(jq -r '.layers[-1].digest' <<<"$manifest")
  size=$(jq -r '.layers[-1].size' <<<"$manifest")
  tc_cap "$PT_UP" 200mbit
  # As containerd would: node 2's agent, for a blob no node holds.
  url="$(agent_url "$N2")/v2/$repo/blobs/$layer?ns=$PT_REG"
  docker exec "$N2" rm -f /tmp/e2e-flowing /tmp/e2e-flowing.head
  before=$(sum_metric mirrorlet_upstream_received_bytes_total)
  bg docker exec "$N2" curl -gs --max-time 300 -D /tmp/e2e-flowing.head -o /tmp/e2e-flowing -w '%{http_code}' "$url" >"$WORK/flowing.code"
  curl_job=$!
  wait_for 60 "the first bytes at $N2" first_bytes "$N2"
  fetched=$(minus "$(sum_metric mirrorlet_upstream_received_bytes_total)" "$before")
  expect "the first bytes arrived while the layer was still downloading ($fetched of $size)" "$fetched" "<" "$((size / 2))"
  wait "$curl_job" || fail "the transfer failed"
  [[ $(<"$WORK/flowing.code") == 200 ]] || fail "status $(<"$WORK/flowing.code")"
  [[ $(docker exec "$N2" sh -c "tr -d '\r' </tmp/e2e-flowing.head" | hdr /dev/stdin content-length) == "$size" ]] || fail "no Content-Length $size"
  [[ $(docker exec "$N2" sha256sum /tmp/e2e-flowing | cut -d' ' -f1) == "${layer#sha256:}" ]] || fail "the layer arrived wrong"
  docker exec "$N2" rm -f /tmp/e2e-flowing /tmp/e2e-flowing.head
  # And a real pull of it works alongside.
  must_pull "$N3" "$PT_REG/$repo:v1"
  tc_uncap "$PT_UP"
}

s_pullthrough_h() {
  local img=$FLAKY_REG/e2e/pt-corrupt:v1 layer mismatches aborted n content
  wait_agents
  wait_members
  registry_up "$PT_UP" "$PT_PUSH"
  for n in "${NODES[@]}"; do rm_image "$n" "$img"; done
  layer=$(blob_digests "http://$PT_PUSH" e2e/pt-corrupt v1 | tail -n 1)
  curl -fsS -X POST "http://$FLAKY_ADMIN/admin/corrupt/$layer" >/dev/null || fail "arming the corruption"
  mismatches=$(sum_metric mirrorlet_upstream_digest_mismatches_total)
  aborted=$(metric "$N1" mirrorlet_ingests_aborted_total)
  # Slow enough that containerd is sure to be reading the layer as it arrives.
  tc_cap "$PT_UP" 200mbit
  if pull "$N1" "$img"; then fail "a corrupt layer was accepted"; fi
  log "first attempt: $(tail_of "$WORK/pull.err.$N1" 200)"
  content=$(content_list "$N1")
  if grep -qF "$layer" <<<"$content"; then fail "wrong bytes were committed"; fi
  expect "the mismatch is counted" "$(minus "$(sum_metric mirrorlet_upstream_digest_mismatches_total)" "$mismatches")" ">=" 1
  expect "containerd's partial download was aborted" "$(minus "$(metric "$N1" mirrorlet_ingests_aborted_total)" "$aborted")" ">=" 1
  tc_uncap "$PT_UP"
  # The retry starts clean and completes (kubelet retries a failed pull).
  must_pull "$N1" "$img"
  content_has "$N1" "$layer" || fail "the verified layer is not there"
}

s_pullthrough_f() {
  local held=$PT_REG/e2e/pt-held:v1 never=$PT_REG/e2e/pt-never:v1 n stale
  wait_agents
  wait_members
  registry_up "$PT_UP" "$PT_PUSH"
  for n in "${NODES[@]}"; do rm_image "$n" "$held"; rm_image "$n" "$never"; done
  must_pull "$N1" "$held"
  stale=$(sum_metric mirrorlet_stale_tags_served_total)
  registry_down "$PT_UP"
  sleep 3 # past the revalidation window (2 s in this suite)
  must_pull "$N2" "$held"
  must_pull "$N3" "$held"
  expect "a stale tag was served" "$(minus "$(sum_metric mirrorlet_stale_tags_served_total)" "$stale")" ">=" 1
  must_fail_pull "$N2" "$never" 60 "nobody has it"
  log "new image, upstream down: $(tail_of "$WORK/pull.err.$N2" 200)"
}

preheat_done() { # node
  local pod out
  pod=$(agent_json_try "$1" | jq -r .metadata.name) || return 1
  out=$(kc logs -n "$NS" "$pod" -c preheat 2>/dev/null) || return 1
  grep -q "images on this node" <<<"$out"
}
s_pullthrough_j() {
  local a=$PT_REG/e2e/pt-preheat:v1 b=$PT_REG/e2e/pt-preheat-b:v1 n mark out pod want repo m d
  local -a old
  wait_agents
  wait_members
  registry_up "$PT_UP" "$PT_PUSH"
  for n in "${NODES[@]}"; do rm_image "$n" "$a"; rm_image "$n" "$b"; done
  mark=$(log_mark "$PT_UP")
  mapfile -t old < <(agent_uids)
  write_values "$WORK/values-preheat.yaml" "$HOSTPORT" "$(all_mirrored)" "preheat:
  images:
    - \"$a\"
    - \"$b\""
  helm upgrade "$RELEASE" "$CHART" -n "$NS" -f "$WORK/values-preheat.yaml" --wait --timeout 5m >/dev/null
  wait_replaced "${old[@]}"
  for n in "${NODES[@]}"; do
    wait_for 300 "the preheat container on $n to finish" preheat_done "$n"
    out=$(kc logs -n "$NS" "$(agent_pod "$n")" -c preheat)
    for want in "pulled $a in " "pulled $b in " "0/2 images" "2 images on this node"; do
      grep -qF "$want" <<<"$out" || fail "$n: no \"$want\" in the preheat log:"$'\n'"$out"
    done
    { has_image "$n" "$a" && has_image "$n" "$b"; } || fail "$n does not hold the preheated images"
  done
  # Through the agents: each manifest and blob fetched once for the whole cluster.
  log_since "$PT_UP" "$mark" | content_gets >"$WORK/gets"
  for repo in e2e/pt-preheat e2e/pt-preheat-b; do
    m=$(manifest_digest "http://$PT_PUSH" "$repo" v1)
    for d in "$m" $(blob_digests "http://$PT_PUSH" "$repo" "$m"); do
      [[ $(count_ending "$d" <"$WORK/gets") == 1 ]] || fail "$d fetched $(count_ending "$d" <"$WORK/gets") times"
    done
  done

  # An image that does not exist is named, and the exit status says so; a malformed
  # reference is refused before anything is pulled.
  pod=$(agent_pod "$N1")
  if out=$(timeout 300 kubectl exec -n "$NS" "$pod" -c mirrorlet -- /mirrorlet preheat --containerd-socket /run/containerd/containerd.sock \
    --agent-url "http://127.0.0.1:$OPS_PORT" --timeout 2m "$PT_REG/e2e/nowhere:v1" 2>&1); then
    fail "preheat of a missing image succeeded: $out"
  fi
  { grep -qF "FAILED $PT_REG/e2e/nowhere:v1" <<<"$out" && grep -qF "1 of 1 images not pulled" <<<"$out"; } || fail "preheat said: $out"
  if out=$(timeout 120 kubectl exec -n "$NS" "$pod" -c mirrorlet -- /mirrorlet preheat Nginx:1 2>&1); then
    fail "preheat took a malformed reference: $out"
  fi
  { grep -qF "Nginx:1" <<<"$out" && grep -qF "not an image reference" <<<"$out"; } || fail "preheat said: $out"

  # The suite's values again.
  mapfile -t old < <(agent_uids)
  helm upgrade "$RELEASE" "$CHART" -n "$NS" -f "$WORK/values.yaml" --wait --timeout 5m >/dev/null
  wait_replaced "${old[@]}"
}

# pullthrough i: a cluster of its own, IPv6 only, deleted at the end.
v6_cleanup() {
  jobs -p | xargs -r kill 2>/dev/null || true
  [[ ${MIRRORLET_KIND_KEEP:-} == 1 ]] && return 0
  kind delete cluster --name "$CLUSTER6" --kubeconfig "$WORK/kubeconfig-ipv6" >/dev/null 2>&1 || true
  docker rm -f "$V6_UP" >/dev/null 2>&1 || true
}
s_pullthrough_i() {
  local ip6 n img=$V6_REG/e2e/pt-ipv6:v1 mark hosts node_ip6 served bad
  local -a agents6
  [[ $(docker network inspect kind -f '{{.EnableIPv6}}') == true ]] \
    || fail "the kind Docker network has no IPv6 (see MIRRORLET_KIND_IPV6 at the top of this script)"
  trap v6_cleanup EXIT
  CLUSTER=$CLUSTER6
  export KUBECONFIG="$WORK/kubeconfig-ipv6"
  start_registry "$V6_UP" "$V6_PUSH"
  wait_for 30 "the IPv6 test registry" curl -fs -o /dev/null "http://$V6_PUSH/v2/"
  ip6=$(docker inspect -f '{{.NetworkSettings.Networks.kind.GlobalIPv6Address}}' "$V6_UP")
  [[ $ip6 == *:* ]] || fail "the registry has no IPv6 address on the kind network"
  make_image "$V6_PUSH" e2e/pt-ipv6:v1 3000000 1000000
  kind create cluster --name "$CLUSTER6" --config "$KIND_DIR/kind-config-ipv6.yaml" --kubeconfig "$KUBECONFIG" --wait 180s
  kubectl wait --for=condition=Ready node --all --timeout=180s >/dev/null
  load_nodes
  kind load docker-image --name "$CLUSTER6" "$IMAGE" >/dev/null
  for n in "${NODES[@]}"; do
    # Only a server: containerd 1.6 refuses `]` in a table header such as [host."http://[::1]"].
    docker exec "$n" mkdir -p "$CERTS/$V6_REG"
    printf 'server = "http://[%s]:5000"\n' "$ip6" | docker exec -i "$n" sh -c "cat >'$CERTS/$V6_REG/hosts.toml'"
  done
  cat >"$WORK/values-ipv6.yaml" <<EOF
image:
  repository: mirrorlet
  tag: e2e
  pullPolicy: Never
mirror:
  registries: ["$V6_REG"]
log:
  format: text
upstream:
  registries: ["$V6_REG"]
  endpoints: ["$V6_REG=http://[$ip6]:5000"]
EOF
  helm install "$RELEASE" "$CHART" -n "$NS" -f "$WORK/values-ipv6.yaml" --wait --timeout 5m >/dev/null
  wait_agents
  wait_members # the agents meet over IPv6

  # configure was given the node's bare IPv6 address, as Kubernetes gives it; it is written
  # bracketed, as dotted keys under [host].
  node_ip6=$(node_ip "$N1")
  [[ $node_ip6 == *:* ]] || fail "$N1's address $node_ip6 is not IPv6"
  hosts=$(docker exec "$N1" cat "$CERTS/$V6_REG/hosts.toml")
  { grep -qx '\[host\]' <<<"$hosts" && grep -qF "\"http://[$node_ip6]:$HOSTPORT\".capabilities" <<<"$hosts"; } \
    || fail "the agent is not written as a dotted key under [host]:"$'\n'"$hosts"

  # Node 1: containerd -> its agent at the IPv6 address -> the registry over IPv6.
  for n in "${NODES[@]}"; do
    agents6+=("$(node_ip "$n")")
    agents6+=("$(agent_ip "$n")")
  done
  mark=$(log_mark "$V6_UP")
  must_pull "$N1" "$img"
  log_since "$V6_UP" "$mark" >"$WORK/log"
  [[ $(content_gets <"$WORK/log" | wc -l) == 4 ]] || fail "not 4 content GETs (manifest, config, two layers): $(cut -f1-3,6 "$WORK/log" | tr '\n' ' ')"
  bad=$(awk -F'\t' -v ok=" ${agents6[*]} " '$6 !~ /^mirrorlet\// || index(ok, " " $1 " ") == 0' "$WORK/log")
  [[ -z $bad ]] || fail "not only agents, over IPv6 (${agents6[*]}), went upstream: $bad"

  # Node 2: no blob upstream, so its layers came from the other agent, over IPv6.
  served=$(metric "$N2" mirrorlet_registry_served_bytes_total requester=containerd)
  mark=$(log_mark "$V6_UP")
  must_pull "$N2" "$img"
  log_since "$V6_UP" "$mark" >"$WORK/log"
  if grep -q /blobs/ "$WORK/log"; then fail "a blob went upstream for node 2: $(cut -f2,3 "$WORK/log" | tr '\n' ' ')"; fi
  expect "node 2's agent served its layers" "$(minus "$(metric "$N2" mirrorlet_registry_served_bytes_total requester=containerd)" "$served")" ">=" 4000000
}

# =======================================================================================
# operations.rs

# Node 1 pulls REPO through the cluster from a front allowing one counted pull, node 2
# pulls it from the nodes, and REPO-other meets the 429.
busy() { # registry repo
  must_pull "$N1" "$1/$2:v1"
  must_pull "$N2" "$1/$2:v1"
  must_fail_pull "$N1" "$1/$2-other:v1" 60 "the budget is spent"
}

s_operations_a() {
  local n json pod out i saw=0 ip
  local -a ids=()
  wait_agents
  wait_members
  registry_up "$PT_UP" "$PT_PUSH"
  busy "$OPS_REG" e2e/ops-status
  for n in "${NODES[@]}"; do ids+=("$(status_json "$n" | jq -er .node.id)"); done
  json=$(status_json "$N1")
  jcheck "node 1's status" "$json" --arg id "${ids[0]}" '.node.id == $id and .node.ready == true and .node.live == true'
  for i in 1 2; do
    jcheck "${ids[i]} listed, connected, with its registry" "$json" --arg id "${ids[i]}" \
      'any(.peers[]; .id == $id and .connected == true and ((.registry // "") | endswith(":5000")))'
  done
  jcheck "node 1's pull is listed" "$json" --arg reg "$OPS_REG" \
    'any(.served.recent[]; (.path | contains("e2e/ops-status/blobs/")) and .status == 200 and .registry == $reg)'
  jcheck "a hit ratio" "$json" '.served.hit_ratio | type == "number"'
  jcheck "the front's budget" "$json" --arg reg "$OPS_REG" 'any(.upstream[]; .registry == $reg and .ratelimit_limit == 1)'
  # The 429 was met by whichever node owned the other image's tag.
  for n in "${NODES[@]}"; do
    json=$(status_json "$n")
    if jq -e --arg reg "$OPS_REG" 'any(.upstream[]; .registry == $reg and ((.last_problem.what // "") | contains("429")))' <<<"$json" >/dev/null; then
      saw=1
    fi
    if grep -qE 'Bearer|token=' <<<"$json"; then fail "secrets in $n's status"; fi
  done
  ((saw == 1)) || fail "no node's status names the 429"
  # The page itself (a browser, as the namespace suite uses, is not available here).
  ip=$(agent_ip "$N1")
  node_fetch "$WORK/page" GET "http://$(url_host "$ip"):$OPS_PORT/status"
  [[ $(<"$WORK/page.code") == 200 && $(hdr "$WORK/page.head" content-type) == text/html* ]] || fail "GET /status: $(<"$WORK/page.code") $(hdr "$WORK/page.head" content-type)"
  for out in "Recently served" "Peers" "Upstream registries" "${ids[0]}" "${ids[1]}" "$OPS_REG"; do
    grep -qF "$out" "$WORK/page.body" || fail "\"$out\" is not on the status page"
  done
  # The terminal view of the same.
  pod=$(agent_pod "$N1")
  out=$(timeout 60 kubectl exec -n "$NS" "$pod" -c mirrorlet -- /mirrorlet status --url "http://127.0.0.1:$OPS_PORT" 2>&1) \
    || fail "mirrorlet status: $out"
  for i in "${ids[0]}" "${ids[1]}" connected "$OPS_REG" "recently served" e2e/ops-status; do
    grep -qF "$i" <<<"$out" || fail "\"$i\" not in mirrorlet status:"$'\n'"$out"
  done
  if out=$(timeout 60 kubectl exec -n "$NS" "$pod" -c mirrorlet -- /mirrorlet status --url http://127.0.0.1:9 2>&1); then
    fail "mirrorlet status succeeded where nothing listens"
  fi
  grep -qF 127.0.0.1:9 <<<"$out" || fail "the error does not name the address: $out"
}

# The dashboard's queries: "title<TAB>expr" per target, NUL-separated (rows' own panels too).
dashboard_targets() {
  jq -j '[.panels[] | ., (.panels // [])[]] | .[] | .title as $t | (.targets // [])[] | "\($t)\t\(.expr)\u0000"' \
    "$CHART/dashboards/mirrorlet.json"
}
type_of() { awk -v n="$1" '$1 == n { print $2; exit }' "$WORK/types"; }
declared() { # sample name: a gauge, a counter's _total or a histogram's _bucket/_sum/_count
  local s
  [[ $(type_of "$1") == gauge ]] && return 0
  [[ $1 == *_total && $(type_of "${1%_total}") == counter ]] && return 0
  for s in _bucket _sum _count; do
    [[ $1 == *"$s" && $(type_of "${1%"$s"}") == histogram ]] && return 0
  done
  return 1
}
has_label() { awk -v n="$1" -v l="$2" '$1 == n && $2 == l { f = 1 } END { exit !f }' "$WORK/labels"; }
s_operations_b() {
  local n entry title expr sel metric inner label must queries=0
  local -a selectors labels_here
  wait_agents
  wait_members
  registry_up "$PT_UP" "$PT_PUSH"
  busy "$DASH_REG" e2e/ops-dash
  : >"$WORK/metrics"
  for n in "${NODES[@]}"; do ops "$n" /metrics >>"$WORK/metrics"; done
  awk '/^# TYPE / { print $3, $4 }' "$WORK/metrics" | sort -u >"$WORK/types"
  # "name label" for every label a sample name carries; "name" alone for samples without.
  awk '!/^#/ && NF >= 2 {
      s = $0; sub(/ [^ ]+$/, "", s); name = s; labels = ""
      i = index(s, "{")
      if (i) { name = substr(s, 1, i - 1); labels = substr(s, i + 1); sub(/}$/, "", labels); gsub(/="[^"]*"/, "", labels) }
      print name; k = split(labels, l, ",")
      for (j = 1; j <= k; j++) if (l[j] != "") print name, l[j]
    }' "$WORK/metrics" | sort -u >"$WORK/labels"
  : >"$WORK/checked"
  while IFS= read -r -d '' entry; do
    title=${entry%%$'\t'*} expr=${entry#*$'\t'}
    queries=$((queries + 1))
    mapfile -t selectors < <(grep -oE 'mirrorlet_[A-Za-z0-9_]+(\{[^}]*\})?' <<<"$expr" || true)
    ((${#selectors[@]} > 0)) || fail "$title: no mirrorlet metric in $expr"
    labels_here=(instance job)
    for sel in "${selectors[@]}"; do
      metric=${sel%%\{*}
      declared "$metric" || fail "$title: $metric is not exported by the agents ($expr)"
      awk -v n="$metric" '$1 == n { f = 1 } END { exit !f }' "$WORK/labels" || continue # no samples
      if [[ $sel == *\{* ]]; then
        inner=${sel#*\{}
        inner=$(sed -E 's/"[^"]*"//g' <<<"${inner%\}}")
        while IFS= read -r label; do
          label=$(sed -E 's/^[[:space:]]*([A-Za-z0-9_]*).*/\1/' <<<"$label")
          [[ -z $label || $label == instance ]] || has_label "$metric" "$label" \
            || fail "$title: $metric has no label $label (has $(awk -v n="$metric" '$1 == n && NF > 1 { printf "%s ", $2 }' "$WORK/labels"))"
        done < <(tr ',' '\n' <<<"$inner")
      fi
      mapfile -t -O "${#labels_here[@]}" labels_here < <(awk -v n="$metric" '$1 == n && NF > 1 { print $2 }' "$WORK/labels")
      echo "$metric" >>"$WORK/checked"
    done
    while IFS= read -r label; do
      label=$(tr -d '[:space:]' <<<"$label")
      [[ -z $label ]] && continue
      [[ " ${labels_here[*]} " == *" $label "* ]] || fail "$title: groups by $label, which none of its metrics carries ($expr)"
    done < <(grep -oE '(^|[^A-Za-z0-9_])by *\([^)]*\)' <<<"$expr" | sed -E 's/.*\((.*)\)/\1/' | tr ',' '\n' || true)
  done < <(dashboard_targets)
  # The pulls above gave most queries samples to check labels against.
  for must in mirrorlet_registry_requests_total mirrorlet_registry_served_bytes_total \
    mirrorlet_registry_request_duration_seconds_bucket mirrorlet_pullthrough_fetches_total \
    mirrorlet_upstream_requests_total mirrorlet_upstream_ratelimit_remaining mirrorlet_upstream_rate_limited_total \
    mirrorlet_lookup_duration_seconds_bucket mirrorlet_p2p_connected_peers; do
    grep -qx "$must" "$WORK/checked" || fail "$must had no samples to check"
  done
  ((queries >= 20)) || fail "only $queries dashboard queries"
  log "$queries dashboard queries checked; labels verified on $(sort -u "$WORK/checked" | wc -l) metrics with samples"
}

# operations c: a Prometheus pod scraping the agents every second.
prom_get() { # api path and query: the JSON answer
  kc get --raw "/api/v1/namespaces/$NS/pods/e2e-prometheus:9090/proxy$1"
}
prom_scrapes_all() {
  local json
  json=$(prom_get '/api/v1/query?query=up' 2>/dev/null) || return 1
  jq -e --argjson n "${#NODES[@]}" '[.data.result[] | select(.value[1] == "1")] | length == $n' <<<"$json" >/dev/null
}
prom_query_range() { # query start end: the result JSON
  local q json
  q=$(jq -rn --arg q "$1" '$q | @uri')
  json=$(prom_get "/api/v1/query_range?query=$q&start=$2&end=$3&step=1") || fail "Prometheus refused: $1"
  jq -e '.status == "success"' <<<"$json" >/dev/null || fail "Prometheus: $json"
  printf '%s\n' "$json"
}
s_operations_c() {
  local n targets="" start end range title expr query json kind peak t hit
  local -a empty=()
  wait_agents
  wait_members
  registry_up "$PT_UP" "$PT_PUSH"
  # Built here, one platform: kind load can fail on a pulled multi-platform image.
  printf 'FROM %s\n' "$PROM_IMAGE" | docker build -q -t mirrorlet-e2e-prometheus:e2e - >/dev/null
  kind load docker-image --name "$CLUSTER" mirrorlet-e2e-prometheus:e2e >/dev/null
  for n in "${NODES[@]}"; do targets+="\"$(agent_ip "$n"):$OPS_PORT\", "; done
  kc delete pod,configmap -n "$NS" e2e-prometheus --ignore-not-found --wait >/dev/null
  kc apply -n "$NS" -f - >/dev/null <<EOF
apiVersion: v1
kind: ConfigMap
metadata:
  name: e2e-prometheus
data:
  prometheus.yml: |
    global:
      scrape_interval: 1s
      scrape_timeout: 1s
    scrape_configs:
      - job_name: mirrorlet
        static_configs:
          - targets: [${targets%, }]
---
apiVersion: v1
kind: Pod
metadata:
  name: e2e-prometheus
spec:
  containers:
    - name: prometheus
      image: mirrorlet-e2e-prometheus:e2e
      imagePullPolicy: Never
      args: ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
      volumeMounts:
        - name: config
          mountPath: /etc/prometheus
  volumes:
    - name: config
      configMap:
        name: e2e-prometheus
EOF
  kubectl wait --for=condition=Ready pod/e2e-prometheus -n "$NS" --timeout=120s >/dev/null
  wait_for 60 "Prometheus to scrape every agent" prom_scrapes_all
  start=$(date +%s)
  # Quiet, pulls, quiet, one more node, quiet: long enough for rates over a few scrapes.
  sleep 3
  busy "$PROM_REG" e2e/ops-prom
  sleep 4
  must_pull "$N3" "$PROM_REG/e2e/ops-prom:v1"
  sleep 6
  end=$(date +%s)
  range=$((end - start + 1))

  # Every panel's queries, Grafana's variables expanded ($__rate_interval: four scrapes and one).
  : >"$WORK/panels"
  while IFS= read -r -d '' title; do
    kind=$(jq -r --arg t "$title" '[.panels[] | select(.title == $t)][0].type' "$CHART/dashboards/mirrorlet.json")
    [[ $kind == row ]] && continue
    peak=""
    while IFS= read -r -d '' expr; do
      query=${expr//\$__rate_interval/5s}
      query=${query//\$__range/${range}s}
      query=${query//\$instance/.*}
      json=$(prom_query_range "$query" "$start" "$end")
      t=$(jq -r '[.data.result[].values[][1] | select(. != "NaN" and . != "+Inf" and . != "-Inf") | tonumber] | max // empty' <<<"$json")
      [[ -z $t ]] || { [[ -n $peak ]] && ! holds "$t" ">" "$peak"; } || peak=$t
    done < <(jq -j --arg t "$title" '.panels[] | select(.title == $t) | (.targets // [])[] | "\(.expr)\u0000"' "$CHART/dashboards/mirrorlet.json")
    if [[ -z $peak ]]; then empty+=("$title"); fi
    printf '%s\t%s\n' "$title" "${peak:-none}" >>"$WORK/panels"
  done < <(jq -j '.panels[] | "\(.title)\u0000"' "$CHART/dashboards/mirrorlet.json")
  ((${#empty[@]} == 0)) || fail "panels without data after real pulls: ${empty[*]}"
  # Counters that appear with their first event show no increase in a rate: the pulls
  # above must show in every panel about pulls.
  for title in "Pulls by source" "Bytes served by source" "Served to other nodes" "Request latency (p99)" \
    "Pull-through fetches" "Upstream requests" "Downloaded from upstream" "429 answers" "Lookup latency"; do
    peak=$(awk -F'\t' -v t="$title" '$1 == t { print $2 }' "$WORK/panels")
    [[ -n $peak ]] || fail "no panel \"$title\""
    holds "$peak" ">" 0 || fail "\"$title\" does not show the pulls (peak $peak)"
  done
  hit=$(awk -F'\t' '$1 == "Hit ratio" { print $2 }' "$WORK/panels")
  { holds "$hit" ">" 0 && holds "$hit" "<=" 1; } || fail "nodes 2 and 3 pulled from the cluster: hit ratio $hit"
  kc delete pod,configmap -n "$NS" e2e-prometheus --ignore-not-found --wait=false >/dev/null
}

# =======================================================================================
# Running.

# Node 2's spool disk is full (a 4 KiB tmpfs over the chart's dataDir/spool, the agent pod
# replaced to see it): a blob from node 1 cannot be written, the agent answers 404 before
# a byte, containerd takes the blob from the registry, and the failure is logged and counted.
replace_agent() { # node
  local uid
  uid=$(agent_uid "$1")
  kc delete pod -n "$NS" "$(agent_pod "$1")" --wait=false >/dev/null
  wait_for 240 "a new agent pod on $1" agent_ready "$1" "$uid"
}
s_p2p_g() {
  local img=$REG/e2e/spool-full:v1 n f0
  wait_agents
  wait_members
  registry_up "$UPSTREAM" "$PUSH"
  for n in "${NODES[@]}"; do rm_image "$n" "$img"; done
  must_pull "$N1" "$img"
  spool_full "$N2"
  replace_agent "$N2"
  wait_members
  f0=$(metric "$N2" mirrorlet_peer_failures_total reason=spool)
  wait_servable "$N2" e2e/spool-full v1
  must_pull "$N2" "$img"
  expect "the failed spool write is counted" "$(minus "$(metric "$N2" mirrorlet_peer_failures_total reason=spool)" "$f0")" ">=" 1
  agent_logs "$N2" >"$WORK/agent.log"
  grep -q "writing the spool failed" "$WORK/agent.log" || fail "no warning about the spool: $(tail_of "$WORK/agent.log" 600)"
  spool_free_all
  replace_agent "$N2"
}

# =======================================================================================
# clients.rs: Docker and podman pull through node 2's agent (its host port), from a
# privileged tools container on the kind network; node 1 holds the image, the upstream is
# down. REG (and docker.io) are not pulled through, so only node 1 can serve it.

CLIENTS=mirrorlet-e2e-clients
in_clients() { docker exec "$CLIENTS" "$@"; }
clients_up() { # a fresh tools container
  docker rm -f "$CLIENTS" >/dev/null 2>&1 || true
  track "$CLIENTS"
  docker run -d --privileged --name "$CLIENTS" --network kind --entrypoint sleep "$TOOLS" infinity >/dev/null
}
# client_pull LIMIT COMMAND...: runs a pull in the tools container; its output goes to
# $WORK/client.out, its time in seconds to $WORK/client.secs; status as the command's.
client_pull() {
  local limit=$1 t0 rc=0
  shift
  t0=$(date +%s)
  in_clients timeout "$limit" "$@" >"$WORK/client.out" 2>&1 || rc=$?
  echo $(($(date +%s) - t0)) >"$WORK/client.secs"
  return "$rc"
}
must_client_pull() { client_pull 180 "$@" || fail "$* failed: $(tail_of "$WORK/client.out")"; }
# A pull nobody can serve fails, and within 60 s (not at the limit).
client_miss() {
  local rc=0
  client_pull 60 "$@" || rc=$?
  ((rc != 0)) || fail "$* succeeded: $(tail_of "$WORK/client.out")"
  ((rc != 124)) || fail "$* hung for 60 s"
  log "$* failed after $(<"$WORK/client.secs") s: $(tail_of "$WORK/client.out" 200)"
}
hold_on_node_1() { # image (as the CRI names it): on node 1 only, the upstream down
  local n
  registry_up "$UPSTREAM" "$PUSH"
  for n in "${NODES[@]}"; do rm_image "$n" "$1"; done
  must_pull "$N1" "$1"
  registry_down "$UPSTREAM"
}

s_clients_a() {
  local repo=e2e/clients-app digest mirror c0 d
  wait_agents
  wait_members
  digest=$(manifest_digest "http://$PUSH" "$repo" v1)
  hold_on_node_1 "docker.io/$repo:v1"
  wait_servable "$N2" "$repo" v1 docker.io
  mirror="$(url_host "$(node_ip "$N2")"):$HOSTPORT"
  c0=$(metric "$N2" mirrorlet_registry_requests_total requester=docker)
  clients_up
  in_clients sh -c "dockerd --registry-mirror http://$mirror --insecure-registry $mirror \
    --storage-driver vfs --iptables=false --ip-masq=false --bridge=none >/var/log/dockerd.log 2>&1 &"
  wait_for 60 "dockerd in $CLIENTS" in_clients docker version
  must_client_pull docker pull "$repo:v1"
  d=$(in_clients docker image inspect --format '{{json .RepoDigests}}' "$repo:v1")
  [[ $d == *"$digest"* ]] || fail "docker recorded $d, not $digest"
  must_client_pull docker pull "$repo@$digest"
  client_miss docker pull e2e/nobody-has-this:v1
  expect "counted as Docker's" "$(minus "$(metric "$N2" mirrorlet_registry_requests_total requester=docker)" "$c0")" ">=" 3
}

s_clients_b() {
  local repo=e2e/clients-app digest mirror c0 r
  wait_agents
  wait_members
  digest=$(manifest_digest "http://$PUSH" "$repo" v1)
  hold_on_node_1 "$REG/$repo:v1"
  wait_servable "$N2" "$repo" v1
  mirror="$(url_host "$(node_ip "$N2")"):$HOSTPORT"
  c0=$(metric "$N2" mirrorlet_registry_requests_total requester=containers)
  clients_up
  for r in "$REG" quay.io; do
    printf '[[registry]]\nlocation = "%s"\ninsecure = true\n[[registry.mirror]]\nlocation = "%s/%s"\ninsecure = true\n\n' "$r" "$mirror" "$r"
  done | docker exec -i "$CLIENTS" sh -c 'cat >/etc/containers/registries.conf'
  local podman=(podman --storage-driver vfs --cgroup-manager cgroupfs --events-backend file pull --quiet)
  must_client_pull "${podman[@]}" "$REG/$repo:v1"
  must_client_pull "${podman[@]}" "$REG/$repo@$digest"
  # The same repository and tag under another registry is another image.
  client_miss "${podman[@]}" "quay.io/$repo:v1"
  client_miss "${podman[@]}" "$REG/$repo-nobody-has-this:v1"
  expect "counted as podman's" "$(minus "$(metric "$N2" mirrorlet_registry_requests_total requester=containers)" "$c0")" ">=" 3
}

SCENARIOS=(
  "node_local a" s_node_local_a
  "node_local b" s_node_local_b
  "node_local c" s_node_local_c
  "node_local d" s_node_local_d
  "node_local e" s_node_local_e
  "p2p a" s_p2p_a
  "p2p b" s_p2p_b
  "p2p c" s_p2p_c
  "p2p d" s_p2p_d
  "p2p e" s_p2p_e
  "p2p f" s_p2p_f
  "p2p g" s_p2p_g
  "pullthrough a" s_pullthrough_a
  "pullthrough b" s_pullthrough_b
  "pullthrough c" s_pullthrough_c
  "pullthrough d" s_pullthrough_d
  "pullthrough e" s_pullthrough_e
  "pullthrough g" s_pullthrough_g
  "pullthrough h" s_pullthrough_h
  "pullthrough j" s_pullthrough_j
  "pullthrough k" s_pullthrough_k
  "pullthrough f" s_pullthrough_f # leaves its registry stopped; later scenarios start it
  "operations a" s_operations_a
  "operations b" s_operations_b
  "operations c" s_operations_c
  "clients a" s_clients_a
  "clients b" s_clients_b
  "upgrade" s_upgrade
  "uninstall" s_uninstall
  "pullthrough i" s_pullthrough_i
)

# run_scenario NAME FUNCTION: runs it in a subshell (nothing it looks up outlives it),
# prints PASS or FAIL and sets OK. Call it as a plain command: in a condition (`if`, `||`)
# bash ignores set -e inside it, subshells included.
OK=0
run_scenario() {
  local name=$1 fn=$2 rc started=$SECONDS
  SCENARIO=$name
  rm -f "$WORK/failed"
  say "-- $name"
  set +e
  (
    set -e
    trap 'jobs -p | xargs -r kill 2>/dev/null || true' EXIT
    "$fn"
  )
  rc=$?
  set -e
  if ((rc == 0)) && [[ ! -e $WORK/failed ]]; then
    say "PASS $name ($((SECONDS - started))s)"
    PASSED+=("$name")
    OK=1
    return 0
  fi
  OK=0
  [[ -e $WORK/failed ]] || say "FAIL $name: exit status $rc"
  rm -f "$WORK/failed"
  FAILED+=("$name")
  kc logs -n "$NS" -l "$AGENTS" -c mirrorlet --tail=25 --prefix 2>/dev/null | sed 's/^/   | /' >&3 || true
}

# After a failed scenario: faults undone, the credentials right, every agent ready; sets OK.
# A plain command, as run_scenario.
recover() {
  local rc n
  local -a spooled=()
  OK=1
  uncut_all
  start_services
  tc_uncap_all
  [[ -s $WORK/spools ]] && mapfile -t spooled < <(sort -u "$WORK/spools")
  spool_free_all
  helm status "$RELEASE" -n "$NS" >/dev/null 2>&1 || return 0
  SCENARIO="recovery after $SCENARIO"
  rm -f "$WORK/failed"
  set +e
  (
    set -e
    set_credentials s3cret
    # A pod that saw a full spool keeps its view of the tmpfs: replace it.
    for n in "${spooled[@]}"; do replace_agent "$n"; done
    wait_agents
  )
  rc=$?
  set -e
  ((rc == 0)) || OK=0
}

summary() {
  say "== ${#PASSED[@]} passed, ${#FAILED[@]} failed, ${#SKIPPED[@]} skipped"
  ((${#FAILED[@]} == 0)) || say "failed: $(printf '%s; ' "${FAILED[@]}")"
}

on_exit() {
  local rc=$? c
  set +e
  trap - ERR
  [[ -n $WORK && -d $WORK ]] || exit "$rc"
  uncut_all
  start_services
  tc_uncap_all
  spool_free_all
  if [[ ${MIRRORLET_KIND_KEEP:-} == 1 ]]; then
    say "kept: clusters $CLUSTER, $CLUSTER6 and the containers in $WORK/containers (KUBECONFIG=$WORK/kubeconfig)"
    exit "$rc"
  fi
  kind delete cluster --name "$CLUSTER" >/dev/null 2>&1
  kind delete cluster --name "$CLUSTER6" --kubeconfig "$WORK/kubeconfig-ipv6" >/dev/null 2>&1
  if [[ -s $WORK/containers ]]; then
    while read -r c; do docker rm -f "$c" >/dev/null 2>&1; done < <(sort -u "$WORK/containers")
  fi
  rm -rf "$WORK"
  exit "$rc"
}

main() {
  local i name fn tool clusters only=${MIRRORLET_KIND_ONLY:-}
  exec 3>&1
  for tool in docker kind kubectl helm skopeo cargo protoc jq curl sha256sum gzip tar awk; do
    command -v "$tool" >/dev/null || { echo "kind e2e: $tool is required" >&2; exit 2; }
  done
  clusters=$(kind get clusters 2>/dev/null || true)
  if grep -qxE "$CLUSTER|$CLUSTER6" <<<"$clusters" || [[ -n $(docker ps -aq --filter name=mirrorlet-e2e) ]]; then
    echo "kind e2e: clusters or containers named mirrorlet-e2e* exist (an earlier run?); remove them first:" >&2
    echo "  kind delete cluster --name $CLUSTER; kind delete cluster --name $CLUSTER6; docker ps -a --filter name=mirrorlet-e2e" >&2
    exit 2
  fi
  ARCH=$(docker version -f '{{.Server.Arch}}')
  WORK=$(mktemp -d)
  : >"$WORK/containers"
  : >"$WORK/stopped"
  : >"$WORK/cuts"
  : >"$WORK/capped"
  export KUBECONFIG="$WORK/kubeconfig"
  trap on_exit EXIT
  trap 'exit 130' INT TERM
  trap 'on_err $? $LINENO "$BASH_COMMAND"' ERR

  say "== setup"
  run_scenario setup s_setup
  ((OK)) || { summary; exit 1; }
  load_nodes
  run_scenario install s_install
  ((OK)) || { summary; exit 1; }
  for ((i = 0; i < ${#SCENARIOS[@]}; i += 2)); do
    name=${SCENARIOS[i]} fn=${SCENARIOS[i + 1]}
    if [[ -n $only && ! $name =~ $only ]]; then
      SKIPPED+=("$name")
      continue
    fi
    if [[ $name == "pullthrough i" && ${MIRRORLET_KIND_IPV6:-} != 1 ]]; then
      say "SKIP pullthrough i: IPv6-only cluster, set MIRRORLET_KIND_IPV6=1 (needs IPv6 on the kind Docker network)"
      SKIPPED+=("$name")
      continue
    fi
    run_scenario "$name" "$fn"
    ((OK)) && continue
    recover
    ((OK)) || { say "FAIL $SCENARIO: the cluster did not recover"; summary; exit 1; }
  done
  run_scenario teardown s_teardown
  summary
  ((${#FAILED[@]} == 0))
}

# Sourcing the file (for checking its helpers) runs nothing.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then main "$@"; fi
