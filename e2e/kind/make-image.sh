#!/usr/bin/env bash
# make-image.sh REGISTRY REPO:TAG SIZE...: pushes a linux/$ARCH (default amd64) OCI image
# whose layers each hold one file of SIZE random bytes, to REGISTRY (host:port, plain
# HTTP; CREDS=user:password if it wants a login). For the kind suite's images beyond the
# sets of e2e-images. Needs skopeo, jq, GNU tar, gzip, sha256sum.
set -euo pipefail
(($# >= 3)) || { echo "usage: $0 REGISTRY REPO:TAG SIZE..." >&2; exit 2; }
registry=$1 ref=$2
shift 2
repo=${ref%:*} tag=${ref##*:}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
mkdir -p "$dir/blobs/sha256"
printf '{"imageLayoutVersion":"1.0.0"}' >"$dir/oci-layout"

# Moves FILE into the layout's blobs and prints its descriptor (media type MEDIA).
blob() {
  local digest size
  digest=$(sha256sum "$1" | cut -d' ' -f1)
  size=$(stat -c %s "$1")
  mv "$1" "$dir/blobs/sha256/$digest"
  jq -cn --arg m "$2" --arg d "sha256:$digest" --argjson s "$size" '{mediaType: $m, digest: $d, size: $s}'
}

layers='[]' diff_ids='[]' i=0
for size in "$@"; do
  rm -rf "$dir/root"
  mkdir -p "$dir/root/layer$i"
  head -c "$size" /dev/urandom >"$dir/root/layer$i/data.bin"
  tar -C "$dir/root" --owner=0 --group=0 --numeric-owner -cf "$dir/layer.tar" "layer$i"
  diff_id="sha256:$(sha256sum "$dir/layer.tar" | cut -d' ' -f1)"
  diff_ids=$(jq -c --arg d "$diff_id" '. + [$d]' <<<"$diff_ids")
  gzip -n -1 "$dir/layer.tar"
  layer=$(blob "$dir/layer.tar.gz" application/vnd.oci.image.layer.v1.tar+gzip)
  layers=$(jq -c --argjson l "$layer" '. + [$l]' <<<"$layers")
  i=$((i + 1))
done
rm -rf "$dir/root"
jq -cn --arg a "${ARCH:-amd64}" --argjson d "$diff_ids" \
  '{architecture: $a, os: "linux", config: {Cmd: ["/bin/true"]}, rootfs: {type: "layers", diff_ids: $d}}' >"$dir/config.json"
config=$(blob "$dir/config.json" application/vnd.oci.image.config.v1+json)
jq -cn --argjson c "$config" --argjson l "$layers" \
  '{schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json", config: $c, layers: $l}' >"$dir/manifest.json"
manifest=$(blob "$dir/manifest.json" application/vnd.oci.image.manifest.v1+json)
jq -cn --argjson m "$manifest" --arg t "$tag" \
  '{schemaVersion: 2, manifests: [$m + {annotations: {"org.opencontainers.image.ref.name": $t}}]}' >"$dir/index.json"
creds=()
if [[ -n ${CREDS:-} ]]; then creds=(--dest-creds "$CREDS"); fi
skopeo copy --quiet --dest-tls-verify=false --retry-times 2 "${creds[@]}" \
  "oci:$dir:$tag" "docker://$registry/$repo:$tag"
