#!/bin/sh
# The Docker-Hub-like front (hub-front) at this container's IPv4 address on the kind
# network: the front on 6000, its "CDN" on 6001. Usage: front.sh UPSTREAM-URL BUDGET|none
# (`hostname -i` would also give the IPv6 address of a dual-stack network).
set -eu
ip=$(ip -4 -o addr show dev eth0 | sed -n 's/.* inet \([0-9.]*\)\/.*/\1/p' | head -n 1)
[ -n "$ip" ] || { echo "front.sh: no IPv4 address on eth0" >&2; exit 1; }
exec /hub-front "$ip:6000" "$ip:6001" "$1" "$2"
