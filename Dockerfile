# syntax=docker/dockerfile:1
#
# lifecycle-scorer container image: a Debian bookworm build stage and a slim runtime stage.
#
#   docker build -t lifecycle-scorer:0.1.0 .
#   docker run --rm -p 8080:8080 lifecycle-scorer:0.1.0            # run --config <the default>
#   docker run --rm lifecycle-scorer:0.1.0 check-config /etc/lifecycle-scorer/lifecycle-scorer.toml
#
# The default command is `run --config /etc/lifecycle-scorer/lifecycle-scorer.toml`, the shipped
# default configuration; mount your own file over it (deploy/k8s/ mounts a ConfigMap there) or
# override single fields with LIFECYCLE_SCORER__<SECTION>__<FIELD> environment variables.
# Linted by scripts/check-deploy (hadolint).

# The toolchain the project is tested with (Cargo.toml's rust-version is the minimum).
ARG RUST_VERSION=1.95

# ---------------------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-bookworm AS builder

# rdkafka is built with the `ssl` feature: librdkafka compiles against the system OpenSSL, found
# through pkg-config. librdkafka itself is built by its own configure script and make (no cmake:
# the `cmake-build` feature is off), zlib (`libz` feature) is the system one. The rust image
# already carries most of these; they are named so the build does not depend on it. Versions
# are not pinned (hadolint DL3008): see the runtime stage.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libssl-dev pkg-config zlib1g-dev make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# Only what the build reads (.dockerignore keeps everything else out): the manifest and lock
# file, the sources, the benches Cargo.toml declares, and the files the binary embeds
# (schemas/*.avsc and the default configuration).
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY schemas ./schemas
COPY deploy/lifecycle-scorer.toml ./deploy/lifecycle-scorer.toml

# The cargo registry and target directory live in BuildKit cache mounts, so a rebuild after a
# source change does not download and compile every dependency again.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin lifecycle-scorer \
    && cp target/release/lifecycle-scorer /usr/local/bin/lifecycle-scorer

# ---------------------------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

# Runtime libraries only: OpenSSL 3 (libssl3, for TLS to brokers and the schema registry) and
# the CA bundle. glibc, libgcc and zlib are already in the base image. Package versions are not
# pinned (hadolint DL3008): the image tag fixes the Debian release, and a pinned version
# disappears from the archive with the next security update, breaking the build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libssl3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A numeric, unprivileged user (the Kubernetes manifests set runAsUser to the same id and
# runAsNonRoot). The service writes no files: the root filesystem may be read-only.
ARG UID=10001
RUN groupadd --system --gid "${UID}" lifecycle-scorer \
    && useradd --system --uid "${UID}" --gid "${UID}" --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin lifecycle-scorer

COPY --from=builder /usr/local/bin/lifecycle-scorer /usr/local/bin/lifecycle-scorer
COPY deploy/lifecycle-scorer.toml /etc/lifecycle-scorer/lifecycle-scorer.toml

USER 10001:10001
# http.listen of the default configuration: /metrics, /healthz, /readyz, /contacts/{id}, /stages.
EXPOSE 8080
# The service stops gracefully on SIGTERM (stops consuming, drains, commits) within
# service.shutdown_timeout_seconds; give the container runtime's stop timeout more than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/lifecycle-scorer"]
CMD ["run", "--config", "/etc/lifecycle-scorer/lifecycle-scorer.toml"]
