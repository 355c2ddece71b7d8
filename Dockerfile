# mirrorlet node agent image.
#   docker build -t mirrorlet:dev .
FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p mirrorlet \
 && strip target/release/mirrorlet

# Runs as root: the agent needs containerd's socket and content files (mounted read-only).
FROM gcr.io/distroless/cc-debian12
COPY --from=build /src/target/release/mirrorlet /mirrorlet
ENTRYPOINT ["/mirrorlet"]
CMD ["run"]
