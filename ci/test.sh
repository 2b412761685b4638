#!/usr/bin/env bash
# README's test command, and what .ci/run runs: every test, on a fresh Debian machine too.
#  1. the tools the tests drive (loop, ext4/xfs, nbdfuse, qemu-io, nbdinfo, ...): installed with
#     apt when missing and this is root with apt; otherwise named, with their packages;
#  2. `cargo test` (arguments forwarded: `ci/test.sh --test csi_sanity`);
#  3. a summary of every test that did not run, in whole or in part, and why. A test that cannot
#     run says so through tests/skip (FLASHCOPY_SKIP_LOG); under CI=true that is a failure,
#     except for the limits of the machine no package lifts (marked so in the list).
set -euo pipefail
cd "$(dirname "$0")/.."

# tool -> Debian package
tools=(
  losetup:mount mount:mount blkid:util-linux
  mkfs.ext4:e2fsprogs resize2fs:e2fsprogs        # ext4 volumes (csi_node, csi_sanity, agent_blockchain)
  mkfs.xfs:xfsprogs xfs_growfs:xfsprogs          # XFS volumes (csi_node)
  qemu-io:qemu-utils qemu-img:qemu-utils         # NBD peers (nbd_peers, agent_*, csi_controller)
  nbdinfo:libnbd-bin nbdcopy:libnbd-bin
  nbdfuse:nbdfuse                                # NBD -> file -> loop (the node plugin's attacher)
)
missing=()
packages=()
for t in "${tools[@]}"; do
  bin=${t%%:*} pkg=${t#*:}
  if ! command -v "$bin" >/dev/null; then
    missing+=("$bin")
    [[ " ${packages[*]} " == *" $pkg "* ]] || packages+=("$pkg")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Debian 12 ships nbdfuse in libnbd-bin; Debian 13 in its own package.
    for i in "${!packages[@]}"; do
      if [ "${packages[$i]}" = nbdfuse ] && ! apt-cache show nbdfuse >/dev/null 2>&1; then
        packages[i]=libnbd-bin
      fi
    done
    apt-get install -y -qq "${packages[@]}"
  else
    echo "ci/test.sh: missing ${missing[*]} (Debian: apt-get install ${packages[*]}); not root with apt," \
      "so the tests that need them will be skipped and listed at the end" >&2
  fi
fi

# The kernel VM (tests/kernel_vm.rs boots Debian's 6.12 kernel under QEMU): qemu-system,
# busybox, the kernel and its initramfs. As root with apt it is installed here; otherwise
# kernel_vm says what it misses (and is listed at the end).
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  ci/vm/setup.sh || echo "ci/test.sh: ci/vm/setup.sh failed; kernel_vm will report it" >&2
fi

skip_log=$(mktemp)
trap 'rm -f "$skip_log"' EXIT
export FLASHCOPY_SKIP_LOG=$skip_log

status=0
cargo test "$@" || status=$?

echo
if [ -s "$skip_log" ]; then
  n=$(sed 's/: .*//' "$skip_log" | sort -u | wc -l)
  echo "ci/test.sh: $n test(s) did not run, in whole or in part:"
  sort -u "$skip_log" | sed 's/^/  /'
  ci=${CI:-}
  if [ -n "$ci" ] && [ "$ci" != false ] && [ "$ci" != 0 ] &&
    grep -qv ' \[a limit of this machine no package lifts\]$' "$skip_log"; then
    echo "ci/test.sh: under CI every test must run" >&2
    [ "$status" -ne 0 ] || status=1
  fi
else
  echo "ci/test.sh: no test skipped anything"
fi
exit "$status"
