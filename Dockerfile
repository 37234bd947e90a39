# syntax=docker/dockerfile:1
#
# The hearth agent image: one binary, the eBPF programs embedded in it.
#
#   docker build -t registry.example.com/hearth:0.1.0 .
#
# The Helm chart (deploy/helm/hearth) runs it as a DaemonSet. This file is
# not built by the repository's CI: its machines run no container engine.

# Build stage: stable Rust for the agent, nightly + rust-src for the kernel
# programs; `cargo xtask build` builds bpf-linker against the nightly's own
# LLVM, then the eBPF object, then the release binary that embeds it
# (README, "Quick start").
FROM rust:1.95-bookworm AS build
RUN rustup toolchain install nightly --profile minimal --component rust-src
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/root/.cache/hearth-tools \
    cargo xtask build \
    && strip --strip-debug -o /hearth target/release/hearth

# Runtime stage: glibc, libgcc and CA certificates (rustls reads the system
# roots for https:// endpoints), no shell, no package manager.
FROM gcr.io/distroless/cc-debian12
COPY --from=build --chmod=0755 /hearth /usr/local/bin/hearth
# The binary needs no root file access: it writes only under
# /var/lib/hearth (mount a volume there) and reads /proc, /sys/kernel/btf
# and the profiled binaries through the capabilities it is given. In
# Kubernetes it runs as uid 0 with every capability dropped except the
# documented ones (a non-root user cannot hold capabilities across exec
# there); with plain Docker:
#   docker run --pid=host --cap-drop=ALL --cap-add=BPF --cap-add=PERFMON \
#     --cap-add=SYS_PTRACE --cap-add=SYSLOG --cap-add=CHECKPOINT_RESTORE \
#     --cap-add=DAC_READ_SEARCH --security-opt apparmor=unconfined \
#     -v /var/lib/hearth:/var/lib/hearth registry.example.com/hearth:0.1.0 run
ENTRYPOINT ["/usr/local/bin/hearth"]
CMD ["run", "--config", "/etc/hearth/config.toml"]
