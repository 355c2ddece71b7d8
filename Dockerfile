# mirrorlet node agent image.
#   docker build -t mirrorlet:dev .
#   docker buildx build --platform linux/amd64,linux/arm64 -t REPO:TAG --push .
# The compiler runs on the build machine's platform and cross-compiles for each target
# platform (no emulation, so an arm64 image builds as fast as an amd64 one).
FROM --platform=$BUILDPLATFORM rust:1.95-bookworm AS build
ARG BUILDARCH
ARG TARGETARCH
RUN set -eu; \
    case "$TARGETARCH" in \
      amd64) triple=x86_64-unknown-linux-gnu; gnu=x86-64; libc=amd64 ;; \
      arm64) triple=aarch64-unknown-linux-gnu; gnu=aarch64; libc=arm64 ;; \
      *) echo "unsupported platform: $TARGETARCH (amd64 and arm64 are)" >&2; exit 1 ;; \
    esac; \
    cross=""; \
    if [ "$TARGETARCH" != "$BUILDARCH" ]; then cross="gcc-$gnu-linux-gnu libc6-dev-$libc-cross"; fi; \
    apt-get update; \
    apt-get install -y --no-install-recommends protobuf-compiler $cross; \
    rm -rf /var/lib/apt/lists/*; \
    rustup target add "$triple"; \
    echo "$triple" > /triple
WORKDIR /src
COPY . .
RUN set -eu; \
    triple=$(cat /triple); \
    cc="$(echo "$triple" | sed 's/-unknown//')-gcc"; \
    export "CARGO_TARGET_$(echo "$triple" | tr 'a-z-' 'A-Z_')_LINKER=$cc"; \
    export "CC_$(echo "$triple" | tr '-' '_')=$cc"; \
    cargo build --release --locked -p mirrorlet --target "$triple"; \
    cp "target/$triple/release/mirrorlet" /mirrorlet; \
    "${cc%gcc}strip" /mirrorlet

# Runs as root: the agent needs containerd's socket and content files (mounted read-only).
FROM gcr.io/distroless/cc-debian12
COPY --from=build /mirrorlet /mirrorlet
ENTRYPOINT ["/mirrorlet"]
CMD ["run"]
