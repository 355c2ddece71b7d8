#!/bin/sh
# Distribution 2.8 for the kind suite: access log on (the scenarios count its GETs); with
# USER and PASSWORD set, htpasswd auth. Listens on IPv4 and IPv6.
#
# `docker exec C /registry.sh stop` and `... start` stop and start the registry process
# while the container and its address stay: clients then get "connection refused", as
# from the namespace suite's stopped upstream (a stopped container's name and address
# would vanish from the network instead).
set -eu
case "${1:-}" in
  stop)
    touch /tmp/registry.down
    pid=$(cat /tmp/registry.pid 2>/dev/null || true)
    [ -n "$pid" ] || exit 0
    kill "$pid" 2>/dev/null || true
    i=0
    while kill -0 "$pid" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    exit 0
    ;;
  start)
    rm -f /tmp/registry.down
    exit 0
    ;;
esac

cat >/etc/registry.yml <<YML
version: 0.1
log:
  level: warn
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: /var/lib/registry
  delete:
    enabled: true
http:
  addr: ":5000"
YML
if [ -n "${USER:-}" ]; then
  htpasswd -Bbn "$USER" "$PASSWORD" >/etc/registry.htpasswd
  printf 'auth:\n  htpasswd:\n    realm: e2e\n    path: /etc/registry.htpasswd\n' >>/etc/registry.yml
fi
trap 'kill "$(cat /tmp/registry.pid 2>/dev/null)" 2>/dev/null; exit 0' TERM INT
while :; do
  if [ ! -e /tmp/registry.down ]; then
    docker-registry serve /etc/registry.yml &
    echo $! >/tmp/registry.pid
    wait $! || true
  fi
  sleep 0.2
done
