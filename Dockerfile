# One image for both roles: `sideyard operator` (with the injection webhook) and the injected
# `sideyard sidecar`. Build: docker build -t ghcr.io/sideyard/sideyard:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src

# Dependencies first, in a layer that only Cargo.toml or Cargo.lock invalidate.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src bench \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > bench/hot_path.rs \
    && echo 'fn main() {}' > bench/push.rs \
    && cargo fetch --locked

COPY src ./src
COPY bench/hot_path.rs bench/push.rs ./bench/
RUN cargo build --release --locked --offline --bin sideyard \
    && install -D -m 0755 target/release/sideyard /out/sideyard

# glibc and libgcc, no shell, no package manager; runs as UID 65532 (nonroot).
FROM gcr.io/distroless/cc-debian12:nonroot

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="sideyard" \
      org.opencontainers.image.description="LLM API gateway for Kubernetes: operator, injection webhook and sidecar" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/sideyard/sideyard"

COPY --from=build /out/sideyard /sideyard
USER 65532:65532
# 7700 sidecar API (loopback only), 7701 sidecar admin, 7801 operator admin, 8443 webhook.
EXPOSE 7701 7801 8443
ENTRYPOINT ["/sideyard"]
