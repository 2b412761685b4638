#!/usr/bin/env bash
# Runs COMMAND as root inside a real Linux kernel (Debian 6.12, from ci/vm/setup.sh) under QEMU TCG.
#
#   ci/vm/run.sh [--timeout SECS] [--mem MIB] [--share DIR]... [--dmesg FILE] [-v] -- COMMAND [ARGS...]
#
# Inside: the host's /usr read-only (so host tools and host-built binaries run unchanged), the git
# toplevel and each --share DIR read-write at the same path, tmpfs /tmp and /run, lo up, the modules
# nbd (nbds_max=16), loop, ext4, xfs, fuse loaded (ublk_drv, overlay via modprobe). COMMAND runs as
# root with the host's bash from the caller's directory, stdin /dev/null, FLASHCOPY_VM=1 and the
# caller's CI, RUST_LOG, RUST_BACKTRACE, RUST_LIB_BACKTRACE, RUST_TEST_THREADS and FLASHCOPY_*.
# Its stdout and stderr come out here (through two serial ports), its exit status is run.sh's.
# A VM that times out exits with 124, one that ends without a status (a kernel panic, a failed
# /init) with 125, saying so on stderr. --dmesg FILE saves the VM's kernel log (`dmesg` works
# inside too; the console shows only critical kernel messages). -v prints the boot time.
# Several run.sh can run at once. ci/vm/setup.sh runs first (quick when the cache is current).
set -euo pipefail

usage() {
  sed -n 's/^#   //p' "$0" >&2
  exit 2
}
timeout_s=900
mem=2048
shares=()
dmesg_out=
verbose=0
while [ $# -gt 0 ]; do
  case "$1" in
    --timeout) timeout_s=${2:?}; shift 2 ;;
    --mem) mem=${2:?}; shift 2 ;;
    --share) shares+=("${2:?}"); shift 2 ;;
    --dmesg) dmesg_out=${2:?}; shift 2 ;;
    -v) verbose=1; shift ;;
    --) shift; break ;;
    *) usage ;;
  esac
done
[ $# -gt 0 ] || usage

here=$(cd "$(dirname "$0")" && pwd)
cache=${FLASHCOPY_VM_CACHE:-/var/cache/flashcopy-vm}
"$here/setup.sh" # quick when the cache is current; builds it otherwise
vm=$cache/current

# The shares: the git toplevel (or the current directory outside git) and each --share, at the
# same absolute path. A share inside another one is already visible through its parent.
top=$(git rev-parse --show-toplevel 2>/dev/null || pwd)
paths=()
for p in "$top" "${shares[@]}"; do
  [ -d "$p" ] || { echo "run.sh: --share $p: not a directory" >&2; exit 2; }
  p=$(realpath "$p")
  case "$p" in
    *,*) echo "run.sh: $p: qemu cannot share a path with a comma" >&2; exit 2 ;;
    /usr | /usr/*) continue ;; # visible (read-only) through the host's /usr
  esac
  paths+=("$p")
done
mapfile -t paths < <(printf '%s\n' "${paths[@]}" | sort -u)

ctl=$(mktemp -d "${TMPDIR:-/tmp}/flashcopy-vm.XXXXXX")
trap 'rm -rf "$ctl"' EXIT
qemu_args=(
  -virtfs "local,path=/usr,mount_tag=hostusr,security_model=none,readonly=on"
  -virtfs "local,path=$ctl,mount_tag=ctl,security_model=none"
)
: >"$ctl/shares"
i=0
prev=
for p in "${paths[@]}"; do
  if [ -n "$prev" ] && [[ "$p" == "$prev"/* ]]; then continue; fi
  prev=$p
  qemu_args+=(-virtfs "local,path=$p,mount_tag=s$i,security_model=none")
  printf 's%s %s\n' "$i" "$p" >>"$ctl/shares"
  i=$((i + 1))
done

# /etc for host tools (users, name service, ld.so's cache, mke2fs.conf), copied at boot.
mkdir -p "$ctl/etc"
for f in passwd group nsswitch.conf hosts services protocols ld.so.cache ld.so.conf \
  ld.so.conf.d mke2fs.conf localtime lvm; do
  if [ -e "/etc/$f" ]; then cp -aL "/etc/$f" "$ctl/etc/"; fi
done

# The command, with a fresh environment and the caller's directory.
{
  echo 'export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
  echo 'export HOME=/root USER=root LOGNAME=root SHELL=/usr/bin/bash TERM=dumb LANG=C.UTF-8'
  for v in CI RUST_LOG RUST_BACKTRACE RUST_LIB_BACKTRACE RUST_TEST_THREADS $(compgen -e FLASHCOPY_); do
    [ -n "${!v+set}" ] && printf 'export %s=%q\n' "$v" "${!v}"
  done
  echo 'export FLASHCOPY_VM=1 # tests can tell they run in the VM'
  printf 'cd -- %q || exit 125\n' "$(pwd -P)"
  printf 'exec'
  printf ' %q' "$@"
  printf '\n'
} >"$ctl/cmd.sh"

# stderr of COMMAND: a second serial port into a FIFO, copied to our stderr.
mkfifo "$ctl/err.in" "$ctl/err.out"
cat "$ctl/err.out" >&2 &
errcat=$!

kernel=$vm/vmlinuz
[ -e "$vm/vmlinux" ] && kernel=$vm/vmlinux # the PVH entry, no decompression
bios=()
[ -e /usr/share/qemu/qboot.rom ] && bios=(-bios /usr/share/qemu/qboot.rom)
start=$(date +%s.%N)
# In the background so that an interrupt here stops the VM: timeout runs qemu in its own process
# group, out of reach of the terminal's Ctrl-C.
timeout --kill-after=10 "$timeout_s" qemu-system-x86_64 \
  -accel tcg,thread=multi -cpu max -smp 1 -m "$mem" "${bios[@]}" \
  -nographic -monitor none -no-reboot -net none \
  -chardev stdio,id=out -serial chardev:out \
  -chardev "pipe,id=err,path=$ctl/err" -serial chardev:err \
  -kernel "$kernel" -initrd "$vm/initramfs.cpio" \
  -append "console=ttyS0 panic=-1 quiet loglevel=3 mitigations=off i8042.noaux i8042.nokbd" \
  "${qemu_args[@]}" </dev/null &
vm_pid=$!
interrupted=0
trap 'interrupted=1; kill -TERM "$vm_pid" 2>/dev/null' INT TERM HUP
status=0
wait "$vm_pid" || status=$?
if [ $interrupted = 1 ]; then
  wait "$vm_pid" 2>/dev/null || true
  echo "run.sh: interrupted, the VM is stopped" >&2
  exit 130
fi
end=$(date +%s.%N)
# Let the copy of stderr end even if qemu never opened the FIFO.
exec 8<>"$ctl/err.out"
exec 8>&-
wait "$errcat" || true

[ -z "$dmesg_out" ] || cp "$ctl/dmesg" "$dmesg_out" 2>/dev/null || true
if [ $status = 124 ] || [ $status = 137 ]; then
  echo "run.sh: the VM timed out after ${timeout_s}s" >&2
  exit 124
elif [ $status != 0 ]; then
  echo "run.sh: qemu failed with status $status" >&2
  exit 125
elif [ ! -e "$ctl/rc" ]; then
  echo "run.sh: the VM ended without an exit status (kernel panic or a failed /init, see above)" >&2
  exit 125
fi
if [ $verbose = 1 ]; then
  printf 'run.sh: kernel up to COMMAND: %ss (guest uptime); qemu start to poweroff: %.1fs\n' \
    "$(cat "$ctl/boot")" "$(awk "BEGIN { print $end - $start }")" >&2
fi
exit "$(cat "$ctl/rc")"
