# syntax=docker/dockerfile:1
# The one image of every flashcopy-csi container (agent, csi controller/node, snapshot-controller,
# kube-sync): the binary plus what the node side runs (mkfs, mount, losetup, nbdfuse).
#
#   docker build -t flashcopy-csi:0.1.0 .
#
# Dependencies come from crates.io only; the protos compile without protoc (protox in build.rs).
# No container engine runs on CI machines: ci/image.sh checks this file's final stage there (the
# same Debian release and packages in a chroot, running the binary, the demo and the node tests).

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# The build stage needs nothing beyond the rust image (gcc for ring's C parts is in it).
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin flashcopy-csi \
 && install -D -m 0755 target/release/flashcopy-csi /out/flashcopy-csi

FROM debian:${DEBIAN_RELEASE}-slim
# util-linux/mount: mount, umount, losetup, blkid; e2fsprogs/xfsprogs: mkfs and resize;
# libnbd-bin: nbdfuse (NBD export as a file, for loop, where the nbd module is missing; on
# bookworm nbdfuse ships in libnbd-bin); fuse3: fusermount3; kmod: modprobe nbd when the host's
# modules are mounted (the kernel nbd attach itself is netlink, from the binary);
# ca-certificates: TLS to the API.
RUN export DEBIAN_FRONTEND=noninteractive \
 && apt-get update \
 && apt-get install -y --no-install-recommends \
      ca-certificates util-linux mount e2fsprogs xfsprogs libnbd-bin fuse3 kmod \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/flashcopy-csi /usr/local/bin/flashcopy-csi
ENTRYPOINT ["/usr/local/bin/flashcopy-csi"]
