#!/usr/bin/env bash
# Smoke test of the VM harness (ci/vm/setup.sh + ci/vm/run.sh), end to end, on a real 6.12 kernel:
# the exit status of COMMAND (and of a timeout and a kernel panic), then in one VM: the nbd module
# with its generic netlink family, a qemu-nbd export attached by nbd-client (netlink mode),
# mkfs.ext4, mount, an O_DIRECT write read back after a remount, a loop device with XFS, ublk's
# control device, and a host-built Rust test binary (`--list`). Prints the times it measured.
#
#   ci/vm/smoke.sh      FLASHCOPY_VM_TEST_BIN=PATH: use this test binary instead of building
#                       `cargo test --no-run --test nbd_proto`
set -euo pipefail

if [ "${1:-}" = --inside ]; then
  # Runs in the VM (through run.sh); every check prints what it checked.
  bin=$2
  fail() {
    echo "smoke: FAIL: $*" >&2
    exit 1
  }
  ok() { echo "smoke: ok: $*"; }

  [ "$(id -u)" = 0 ] || fail "not root"
  [ "$(readlink /proc/self/exe)" = /usr/bin/readlink ] || fail "/proc/self/exe"
  { [ -d /sys/module/nbd ] && [ -b /dev/nbd0 ] && [ -b /dev/nbd15 ] && [ ! -e /dev/nbd16 ]; } ||
    fail "nbd with nbds_max=16"
  [ -e /sys/block/nbd0 ] || fail "/sys/block/nbd0"
  ok "nbd module loaded, /dev/nbd0../dev/nbd15"
  genl ctrl get name nbd | grep 'Name: nbd' >/dev/null || fail "the nbd generic netlink family"
  ok "generic netlink family nbd"

  # A file served by the host's qemu-nbd on a unix socket, attached with the host's nbd-client.
  truncate -s 256M /tmp/disk.img
  qemu-nbd -k /tmp/nbd.sock -f raw -t /tmp/disk.img &
  for _ in $(seq 50); do [ -S /tmp/nbd.sock ] && break; sleep 0.1; done
  nbd-client -u /tmp/nbd.sock /dev/nbd0 >/dev/null 2>&1 || fail "nbd-client"
  [ "$(cat /sys/block/nbd0/size)" = $((256 << 11)) ] || fail "/dev/nbd0 size"
  # nbd-client's netlink mode leaves no process behind; the ioctl mode keeps one in NBD_DO_IT.
  pid=$(cat /sys/block/nbd0/pid)
  [ ! -e "/proc/$pid" ] || fail "nbd-client still runs: not the netlink mode"
  ok "qemu-nbd export on /dev/nbd0 through nbd-client's netlink mode"

  mkfs.ext4 -q /dev/nbd0 || fail "mkfs.ext4"
  mkdir -p /mnt/nbd
  mount /dev/nbd0 /mnt/nbd || fail "mount"
  head -c 4M /dev/urandom >/tmp/pattern
  dd if=/tmp/pattern of=/mnt/nbd/data bs=1M oflag=direct conv=fsync status=none ||
    fail "O_DIRECT write"
  umount /mnt/nbd
  mount /dev/nbd0 /mnt/nbd || fail "mount again"
  dd if=/mnt/nbd/data of=/tmp/back bs=1M iflag=direct status=none || fail "O_DIRECT read"
  cmp /tmp/pattern /tmp/back || fail "what was read is not what was written"
  umount /mnt/nbd
  nbd-client -d /dev/nbd0 >/dev/null 2>&1 || fail "nbd-client -d"
  ok "ext4 on /dev/nbd0: 4 MiB written with O_DIRECT, read back after a remount"

  # The same over TCP on the loopback interface (how an agent serves its exports).
  qemu-nbd -b 127.0.0.1 -p 10809 -f raw -t /tmp/pattern &
  for _ in $(seq 50); do nbd-client -l 127.0.0.1 >/dev/null 2>&1 && break; sleep 0.1; done
  nbd-client 127.0.0.1 10809 /dev/nbd1 >/dev/null 2>&1 || fail "nbd-client over TCP"
  cmp /tmp/pattern /dev/nbd1 || fail "/dev/nbd1 over TCP does not read the served file"
  nbd-client -d /dev/nbd1 >/dev/null 2>&1 || fail "nbd-client -d /dev/nbd1"
  ok "/dev/nbd1 over TCP on 127.0.0.1 reads the served file"

  truncate -s 320M /tmp/xfs.img
  loop=$(losetup -f --show /tmp/xfs.img) || fail "losetup"
  { mkfs.xfs -q "$loop" && mount "$loop" /mnt/nbd; } || fail "xfs on $loop"
  { echo hello >/mnt/nbd/f && umount /mnt/nbd && losetup -d "$loop"; } || fail "xfs use"
  ok "xfs on a loop device"

  { modprobe ublk_drv && [ -c /dev/ublk-control ]; } || fail "ublk_drv"
  ok "ublk_drv: /dev/ublk-control"

  if dmesg | grep -iE 'I/O error|EXT4-fs error|XFS.*(error|corrupt)|Call Trace'; then
    fail "kernel log (above)"
  fi
  ok "no I/O error in the kernel log"

  "$bin" --list >/tmp/list || fail "the host-built test binary $bin"
  n=$(grep -c ': test$' /tmp/list || true)
  [ "$n" -gt 0 ] || fail "$bin --list lists no test"
  ok "host-built test binary runs: $n tests listed by ${bin##*/}"
  exit 0
fi

cd "$(dirname "$0")/../.."
now() { date +%s.%N; }
since() { awk "BEGIN { printf \"%.1f\", $(now) - $1 }"; }
fail() {
  echo "smoke: FAIL: $*" >&2
  exit 1
}

t=$(now)
ci/vm/setup.sh
echo "smoke: setup.sh: $(since "$t")s"

bin=${FLASHCOPY_VM_TEST_BIN:-}
if [ -z "$bin" ]; then
  t=$(now)
  bin=$(cargo test --no-run --test nbd_proto --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
  [ -n "$bin" ] || fail "cargo test --no-run --test nbd_proto gave no executable"
  echo "smoke: cargo test --no-run --test nbd_proto: $(since "$t")s"
fi
bin=$(realpath "$bin")
share=(--share "$(dirname "$bin")") # a CARGO_TARGET_DIR outside the repository

# The exit status: COMMAND's own, a timeout, a kernel panic.
t=$(now)
ci/vm/run.sh -v -- true || fail "run.sh -- true"
echo "smoke: a VM running \`true\`, qemu start to exit: $(since "$t")s"
rc=0
ci/vm/run.sh -- bash -c 'exit 42' || rc=$?
[ $rc = 42 ] || fail "run.sh -- bash -c 'exit 42' exited with $rc"
echo "smoke: ok: the status of COMMAND is run.sh's (42)"
rc=0
ci/vm/run.sh --timeout 2 -- true 2>/dev/null || rc=$?
[ $rc = 124 ] || fail "a timed-out VM exited with $rc, not 124"
echo "smoke: ok: a VM that times out exits with 124"
rc=0
ci/vm/run.sh -- bash -c 'echo c >/proc/sysrq-trigger' >/dev/null 2>&1 || rc=$?
[ $rc = 125 ] || fail "a VM whose kernel panics exited with $rc, not 125"
echo "smoke: ok: a VM whose kernel panics exits with 125"

t=$(now)
ci/vm/run.sh -v "${share[@]}" -- ci/vm/smoke.sh --inside "$bin" || fail "inside the VM"
echo "smoke: the checks in the VM, qemu start to exit: $(since "$t")s"
echo "smoke: passed"
