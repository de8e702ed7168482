# syntax=docker/dockerfile:1
#
# loadgate as a container image: a static-ish Rust binary that needs only glibc and
# libgcc_s at run time.
#
#   docker build -t loadgate .
#   docker run --rm loadgate check-config /etc/loadgate/loadgate.toml
#   docker run --rm --network container:my-spring-app loadgate      # as a sidecar
#   docker run --rm -p 8000:8000 -p 9901:9901 \
#       -v "$PWD/my-loadgate.toml:/etc/loadgate/loadgate.toml:ro" loadgate
#
# The built-in config (deploy/container/loadgate.toml) listens on 0.0.0.0: loadgate's
# own defaults are loopback, which nothing outside the container could reach.

# The builder: Debian 12 (bookworm), the same glibc (2.36) as the runtime image below,
# so the binary links against nothing newer than it finds at run time. The version is
# the toolchain the project is built and tested with (rust-version in Cargo.toml is the
# oldest that builds it).
ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
# Everything the build reads: the manifest and lock file, the sources, the demo config
# (embedded in the binary by include_str!), and the benches (declared as targets in
# Cargo.toml, so cargo wants their files present even for a plain build).
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY config ./config
# Line tables dropped from the image's binary (Cargo.toml keeps them for profiling):
# a panic still names its functions. The cache mounts keep the registry and target/
# between builds; the binary is copied out of the mount.
ENV CARGO_PROFILE_RELEASE_STRIP=debuginfo
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin loadgate \
    && install -D -m 0755 target/release/loadgate /out/loadgate

# The runtime: distroless "cc" has glibc, libgcc_s and CA certificates and nothing else:
# no shell, no package manager, so nothing for an intruder to use and few CVEs to
# patch. The :nonroot tag runs as uid 65532. The price: no shell to `kill -HUP` from
# and no curl for a HEALTHCHECK (see below); debian:bookworm-slim with a user of its
# own would have a shell, and 70 MB more.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/loadgate /usr/local/bin/loadgate
COPY deploy/container/loadgate.toml /etc/loadgate/loadgate.toml
# Numeric, so Kubernetes' runAsNonRoot can check it without looking up a name.
USER 65532:65532
# 8000: the data port (clients); 9901: the admin port (/healthz, /readyz, /metrics,
# /status: keep it off the public network).
EXPOSE 8000 9901
# No HEALTHCHECK: distroless has no shell and no HTTP client to run one with. Probe the
# admin port from outside instead: Kubernetes httpGet probes on /healthz (liveness) and
# /readyz (readiness), or a load balancer's health check on /readyz.
# SIGTERM (docker stop, Kubernetes) turns /readyz 503, serves on for
# server.shutdown_delay_ms, then drains for up to drain_timeout_ms: give the container
# that long (docker stop -t 40, terminationGracePeriodSeconds).
ENTRYPOINT ["/usr/local/bin/loadgate"]
CMD ["run", "--config", "/etc/loadgate/loadgate.toml"]
