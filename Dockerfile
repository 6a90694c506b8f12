# syntax=docker/dockerfile:1
# Static (musl) binaries in minimal non-root images, for linux/amd64 and linux/arm64.
#   docker build --target hub   -t shapeblock-hub   .
#   docker build --target agent -t shapeblock-agent .
#   docker buildx build --platform linux/amd64,linux/arm64 --target hub -t <registry>/shapeblock-hub:<version> --push .
# .ci/run builds the same binaries with the same commands (no Docker engine there).

# The build stage runs on the builder's own platform (BUILDPLATFORM) and cross-compiles for the
# image's (TARGETARCH): the final stages are `scratch` plus copied files, so nothing runs
# emulated, and a multi-arch build costs two native-speed compiles instead of one under qemu
# (many times slower).
# The exact toolchain of rust-toolchain.toml, so the image builds what CI checked.
FROM --platform=$BUILDPLATFORM rust:1.95.0-bookworm AS build
ARG TARGETARCH
ARG BUILDARCH
# musl-gcc for a native build; for a cross build, Debian's cross gcc, which compiles the C code
# (ring, mimalloc) and links against the Rust target's own static musl, as .ci/run does.
RUN case "$TARGETARCH" in \
      amd64) cross=gcc-x86-64-linux-gnu libc=libc6-dev-amd64-cross ;; \
      arm64) cross=gcc-aarch64-linux-gnu libc=libc6-dev-arm64-cross ;; \
      *) echo "unsupported TARGETARCH '$TARGETARCH' (amd64 or arm64)" >&2; exit 1 ;; \
    esac \
 && if [ "$TARGETARCH" = "$BUILDARCH" ]; then cross=musl-tools libc=; fi \
 && apt-get update && apt-get install -y --no-install-recommends $cross $libc \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Its components and both musl targets, as rust-toolchain.toml lists them, in a layer that
# source changes do not invalidate.
COPY rust-toolchain.toml ./
RUN rustup toolchain install
COPY . .
RUN case "$TARGETARCH" in \
      amd64) target=x86_64-unknown-linux-musl gcc=x86_64-linux-gnu-gcc ;; \
      arm64) target=aarch64-unknown-linux-musl gcc=aarch64-linux-gnu-gcc ;; \
    esac \
 && target_env=$(echo "$target" | tr 'a-z-' 'A-Z_') \
 && if [ "$TARGETARCH" = "$BUILDARCH" ]; then \
      export "CC_$(echo "$target" | tr - _)=musl-gcc"; \
    else \
      export "CC_$(echo "$target" | tr - _)=$gcc" "CARGO_TARGET_${target_env}_LINKER=$gcc"; \
    fi \
 && cargo build --locked --release --target "$target" --bin shapeblock-hub \
 && cargo build --locked --profile agent --target "$target" --bin shapeblock-agent \
 && mkdir -p /out/data \
 && cp "target/$target/release/shapeblock-hub" "target/$target/agent/shapeblock-agent" /out/

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
