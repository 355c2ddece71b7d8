#!/usr/bin/env bash
# Installs what building and the end-to-end tests need on Debian, if missing:
# protoc (containerd-client's build script), containerd, the Distribution registry,
# skopeo, iproute2 (ip, tc), apache2-utils (htpasswd), python3-yaml (the chart's values
# table check), chromium (the status page's browser test), prometheus (evaluates the
# dashboard's queries), shellcheck (lints the kind suite), the Docker engine and podman
# (other clients of the agent), and cargo-deny (make lint). Idempotent; needs root.
set -euo pipefail

need=()
command -v protoc >/dev/null || need+=(protobuf-compiler)
command -v containerd >/dev/null || need+=(containerd)
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v skopeo >/dev/null || need+=(skopeo)
command -v ip >/dev/null || need+=(iproute2)
command -v htpasswd >/dev/null || need+=(apache2-utils)
command -v make >/dev/null || need+=(make)
python3 -c 'import yaml' 2>/dev/null || need+=(python3-yaml)
command -v chromium >/dev/null || need+=(chromium)
[ -x /usr/bin/prometheus ] || need+=(prometheus)
command -v shellcheck >/dev/null || need+=(shellcheck)
[ -x /usr/sbin/dockerd ] || need+=(docker.io)
[ -x /usr/bin/podman ] || need+=(podman)

if ((${#need[@]})); then
  echo "setup: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${need[@]}"
fi
if ! cargo deny --version >/dev/null 2>&1; then
  echo "setup: installing cargo-deny (make lint checks licences, bans and sources with it)"
  cargo install --locked --quiet cargo-deny
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: cargo-nextest not found; tests will run with cargo test" >&2
fi
