#!/bin/sh
# Distribution 2.8 for the kind suite's pull-through scenarios: access log on (the tests
# count its GETs); with USER and PASSWORD set, htpasswd auth.
set -eu
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
  addr: 0.0.0.0:5000
YML
if [ -n "${USER:-}" ]; then
  htpasswd -Bbn "$USER" "$PASSWORD" >/etc/registry.htpasswd
  printf 'auth:\n  htpasswd:\n    realm: e2e\n    path: /etc/registry.htpasswd\n' >>/etc/registry.yml
fi
exec docker-registry serve /etc/registry.yml
