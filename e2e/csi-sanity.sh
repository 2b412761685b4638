#!/usr/bin/env bash
# Runs the upstream CSI conformance suite (kubernetes-csi/csi-test `csi-sanity`, v5.5) against
# `flashcopy-csi standalone`. Needs a `csi-sanity` binary on PATH (build it yourself from
# csi-test; nothing here downloads it) and root (the node service mounts).
#
#   e2e/csi-sanity.sh [extra csi-sanity flags...]
#
# Exits with csi-sanity's status; prints "skipped" and exits 0 when csi-sanity is not installed.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v csi-sanity >/dev/null; then
  echo "skipped: csi-sanity is not on PATH (build it from kubernetes-csi/csi-test v5.5: cmd/csi-sanity)"
  exit 0
fi

cargo build --release --quiet
bin="${CARGO_TARGET_DIR:-target}/release/flashcopy-csi"
work=$(mktemp -d /tmp/flashcopy-sanity.XXXXXX)
cleanup() {
  [ -n "${pid:-}" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

"$bin" standalone --data-dir "$work/data" --node-id sanity-node >"$work/standalone.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
  [ -S "$work/data/csi.sock" ] && break
  sleep 0.1
done
[ -S "$work/data/csi.sock" ] || { cat "$work/standalone.log"; echo "standalone did not start" >&2; exit 1; }

csi-sanity \
  --csi.endpoint "unix://$work/data/csi.sock" \
  --csi.mountdir "$work/mnt" \
  --csi.stagingdir "$work/staging" \
  --csi.testvolumesize 67108864 \
  --csi.testvolumeexpandsize 134217728 \
  "$@"
