# syntax=docker/dockerfile:1
# Static (musl) binaries in minimal non-root images.
#   docker build --target hub   -t shapeblock-hub   .
#   docker build --target agent -t shapeblock-agent .
# .ci/run builds the same binaries with the same commands (no Docker engine there).

# The exact toolchain of rust-toolchain.toml, so the image builds what CI checked.
FROM rust:1.95.0-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Its components and the musl target, as rust-toolchain.toml lists them, in a layer that source
# changes do not invalidate.
COPY rust-toolchain.toml ./
RUN rustup toolchain install
COPY . .
ENV CC_x86_64_unknown_linux_musl=musl-gcc
RUN cargo build --locked --release --target x86_64-unknown-linux-musl --bin shapeblock-hub \
 && cargo build --locked --profile agent --target x86_64-unknown-linux-musl --bin shapeblock-agent \
 && mkdir -p /out/data \
 && cp target/x86_64-unknown-linux-musl/release/shapeblock-hub target/x86_64-unknown-linux-musl/agent/shapeblock-agent /out/

# The hub: a static binary, CA roots for outbound TLS, a writable data directory.
FROM scratch AS hub
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/shapeblock-hub /shapeblock-hub
COPY --from=build --chown=65532:65532 /out/data /var/lib/shapeblock-hub
USER 65532:65532
ENV SHAPEBLOCK_HUB_LISTEN=0.0.0.0:8080 SHAPEBLOCK_HUB_DATA_DIR=/var/lib/shapeblock-hub
EXPOSE 8080
ENTRYPOINT ["/shapeblock-hub"]

# The agent: a static binary and nothing else (it trusts the public roots compiled in, or
# the hub CA it is given).
FROM scratch AS agent
COPY --from=build /out/shapeblock-agent /shapeblock-agent
USER 65532:65532
ENTRYPOINT ["/shapeblock-agent"]
