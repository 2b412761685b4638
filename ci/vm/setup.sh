#!/usr/bin/env bash
# Prepares what ci/vm/run.sh boots: Debian's bookworm-backports 6.12 kernel (it has nbd, ublk,
# loop, 9p; the sandbox kernel of these machines has none of them) and a small busybox initramfs.
# Idempotent: when the cache is complete it only checks a stamp (well under a second).
#
#   ci/vm/setup.sh [--update]     --update: look for a newer 6.12 kernel even when one is cached
#
# Cache: ${FLASHCOPY_VM_CACHE:-/var/cache/flashcopy-vm}; `current` points at the build in use.
# The machine's own apt sources are not touched: the kernel .deb comes through a private APT_CONFIG
# (cache/apt), is unpacked with dpkg-deb -x, never installed. Needs root for apt-get install.
#
# For the lead, lines to add (not added here on purpose):
#   .ci/run, after the line that lints e2e/k8s.sh (add ci/vm/*.sh to that shellcheck line), at the end:
#   | ci/vm/smoke.sh     # a real 6.12 kernel under QEMU TCG: nbd, ext4, a host-built test binary
#   README.md, in the testing section:
#   | Tests that need a real kernel (the kernel nbd driver, ublk, loop, netlink) run in a VM:
#   | `ci/vm/setup.sh` once (downloads Debian's 6.12 kernel, builds an initramfs), then
#   | `ci/vm/run.sh [--timeout S] [--mem MIB] [--share DIR]... [--dmesg FILE] -- COMMAND...`
#   | runs COMMAND as root inside, from the same directory, with the repository (and each
#   | --share, e.g. a CARGO_TARGET_DIR outside it) at the same path and the host's /usr, so
#   | host-built test binaries run unchanged. `ci/vm/smoke.sh` checks the harness end to end.
set -euo pipefail

cache=${FLASHCOPY_VM_CACHE:-/var/cache/flashcopy-vm}
update=0
case "${1:-}" in
  --update) update=1 ;;
  "") ;;
  *) echo "usage: $0 [--update]" >&2; exit 2 ;;
esac

# Modules the VM gets (with their dependencies). The first group mounts the 9p shares at boot.
boot_modules=(virtio_pci 9pnet_virtio 9p)
modules=(nbd loop ext4 xfs fuse ublk_drv netfs 9pnet overlay)

# The stamp covers this script (it holds /init) and busybox: any change rebuilds the initramfs.
stamp_of() { cat "$0" /bin/busybox | sha256sum | cut -c1-16; }

mkdir -p "$cache/kernel"
exec 9>"$cache/lock"
flock 9 # concurrent run.sh/setup.sh wait here instead of building twice

# Host packages: the VM runs the host's /usr, so the tools used inside are installed here too.
need=()
installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
for p in busybox-static cpio kmod e2fsprogs xfsprogs nbd-client xz-utils zstd; do
  installed "$p" || need+=("$p")
done
if ! installed qemu-system-x86; then
  # qemu-system-x86 must come from the release of an installed qemu-utils (a backports
  # qemu-utils 10 and bookworm's qemu-system 7.2 cannot be installed together).
  if [[ "$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null)" == *~bpo12* ]]; then
    need+=(qemu-system-x86/bookworm-backports qemu-system-common/bookworm-backports
      qemu-system-data/bookworm-backports seabios/bookworm-backports)
  else
    need+=(qemu-system-x86)
  fi
fi
installed qemu-utils || need+=(qemu-utils) # qemu-nbd, for the smoke test

# The private apt: bookworm, its updates and security, and bookworm-backports.
apt_dir=$cache/apt
export APT_CONFIG=$apt_dir/apt.conf
mkdir -p "$apt_dir"/{lists/partial,archives/partial,parts,prefs}
cat >"$apt_dir/sources.list" <<'EOF'
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian bookworm-backports main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
cat >"$apt_dir/apt.conf" <<EOF
Dir::Etc::SourceList "$apt_dir/sources.list";
Dir::Etc::SourceParts "$apt_dir/parts";
Dir::Etc::PreferencesParts "$apt_dir/prefs";
Dir::State::Lists "$apt_dir/lists";
Dir::Cache "$apt_dir";
Dir::Cache::archives "$apt_dir/archives";
APT::Sandbox::User "root";
EOF
apt_updated=0
apt_update() {
  [ $apt_updated = 1 ] && return
  echo "setup: apt-get update (private lists in $apt_dir)" >&2
  apt-get update -qq
  apt_updated=1
}

if [ ${#need[@]} -gt 0 ]; then
  apt_update
  echo "setup: installing ${need[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi

# The kernel: the newest linux-image-6.12.N+deb12-amd64 of bookworm-backports.
kver=$(find "$cache/kernel" -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -V | tail -1)
if [ -z "$kver" ] || [ $update = 1 ]; then
  apt_update
  pkg=$(apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb12-amd64$' | cut -d' ' -f1 |
    sort -V | tail -1)
  [ -n "$pkg" ] || { echo "setup: no linux-image-6.12.*+deb12-amd64 in bookworm-backports" >&2; exit 1; }
  newest=${pkg#linux-image-}
  if [ "$newest" != "$kver" ]; then
    echo "setup: downloading $pkg" >&2
    rm -rf "$cache/download" && mkdir -p "$cache/download"
    (cd "$cache/download" && apt-get download -qq "$pkg")
    dpkg-deb -x "$cache"/download/*.deb "$cache/download/root"
    mv "$cache/download/root" "$cache/kernel/$newest"
    rm -rf "$cache/download"
    kver=$newest
  fi
fi
kroot=$cache/kernel/$kver
stamp=$(stamp_of)
build=$cache/build-$kver-$stamp
if [ -e "$build/stamp" ] && [ "$(readlink "$cache/current")" = "${build##*/}" ]; then
  exit 0
fi

# Modules: depmod the unpacked tree (the .deb ships no modules.dep), resolve with modprobe.
moddir=
for d in "$kroot/lib/modules/$kver" "$kroot/usr/lib/modules/$kver"; do
  [ -d "$d" ] && moddir=$d && break
done
[ -n "$moddir" ] || { echo "setup: no modules in $kroot" >&2; exit 1; }
mroot=${moddir%/lib/modules/*}
[ -e "$moddir/modules.dep" ] || depmod -b "$mroot" "$kver"
deps_of() { # module paths (relative to the modules dir) in load order
  modprobe -d "$mroot" -S "$kver" --show-depends "$@" | awk '$1 == "insmod" { print $2 }' |
    sed "s|^$moddir/||"
}

echo "setup: building the initramfs for $kver" >&2
tmp=$(mktemp -d "$cache/initramfs.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
root=$tmp/root
mkdir -p "$root"/{bb,dev,etc,lib,proc,sys,tmp,run,usr,root,mnt}
ln -s usr/bin "$root/bin"
ln -s usr/sbin "$root/sbin"
ln -s usr/lib64 "$root/lib64"
# /lib is a directory, not the usual symlink: it holds lib/modules (the host's /usr has none for
# this kernel); /init links every entry of the host's /usr/lib into it at boot.
mknod "$root/dev/console" c 5 1
cp /bin/busybox "$root/bb/busybox"
for applet in $("$root/bb/busybox" --list); do
  [ "$applet" = busybox ] || ln -s busybox "$root/bb/$applet"
done

mdst=$root/lib/modules/$kver
mkdir -p "$mdst"
for f in modules.builtin modules.builtin.modinfo modules.order; do
  [ -e "$moddir/$f" ] && cp "$moddir/$f" "$mdst/"
done
for m in "${boot_modules[@]}" "${modules[@]}"; do
  modprobe -d "$mroot" -S "$kver" -n "$m" >/dev/null 2>&1 ||
    { echo "setup: module $m is missing from $kver" >&2; exit 1; }
done
for rel in $(deps_of -a "${boot_modules[@]}" "${modules[@]}" | sort -u); do
  mkdir -p "$mdst/$(dirname "$rel")"
  case "$rel" in
    *.xz) xz -dc "$moddir/$rel" >"$mdst/${rel%.xz}" ;;
    *.zst) zstd -qdc "$moddir/$rel" >"$mdst/${rel%.zst}" ;;
    *.gz) gzip -dc "$moddir/$rel" >"$mdst/${rel%.gz}" ;;
    *) cp "$moddir/$rel" "$mdst/$rel" ;;
  esac
done
sed -i -E 's/\.ko\.(xz|zst|gz)/.ko/g' "$mdst/modules.order" 2>/dev/null || true
depmod -b "$root" "$kver"
# busybox insmod (no modprobe before /usr is mounted) loads these in this order.
for m in "${boot_modules[@]}"; do deps_of "$m"; done | sed -E 's/\.ko\.(xz|zst|gz)$/.ko/' |
  awk '!seen[$0]++' >"$root/lib/modules/boot.order"

cat >"$root/init" <<'EOF'
#!/bb/sh
# /init of the flashcopy test VM (written by ci/vm/setup.sh; ci/vm/run.sh fills the $ctl share).
export PATH=/bb
ctl=/run/flashcopy-vm
die() {
  echo "vm init: $*" >&2
  poweroff -f
}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr

kver=$(uname -r)
while read -r m; do
  insmod "/lib/modules/$kver/$m" || die "insmod $m failed"
done </lib/modules/boot.order
o=trans=virtio,version=9p2000.L,msize=524288
mount -t 9p -o "$o,ro,cache=loose" hostusr /usr || die "cannot mount the host's /usr"
mkdir -p $ctl
mount -t 9p -o "$o" ctl $ctl || die "cannot mount the control share"
for e in /usr/lib/*; do
  [ "${e##*/}" = modules ] || ln -s "$e" /lib/
done
# Each line of shares: TAG PATH (parents first), mounted at the same path as on the host.
while read -r tag path; do
  mkdir -p "$path" && mount -t 9p -o "$o" "$tag" "$path" || die "cannot mount $path"
done <$ctl/shares
cp -a $ctl/etc/. /etc/ 2>/dev/null
ln -sf ../proc/self/mounts /etc/mtab
hostname flashcopy-vm
echo flashcopy-vm >/etc/hostname
ip link set lo up
# From here the host's kmod modprobe reads /lib/modules/$kver/modules.dep.bin.
/usr/sbin/modprobe nbd nbds_max=16 || die "modprobe nbd failed"
/usr/sbin/modprobe -a loop ext4 xfs fuse || die "modprobe failed"

stty -F /dev/ttyS0 -opost 2>/dev/null
stty -F /dev/ttyS1 -opost 2>/dev/null
cut -d' ' -f1 /proc/uptime >$ctl/boot
env -i /usr/bin/bash --noprofile --norc $ctl/cmd.sh </dev/null >/dev/ttyS0 2>/dev/ttyS1
echo $? >$ctl/rc.tmp
dmesg >$ctl/dmesg
mv $ctl/rc.tmp $ctl/rc
sync
echo 0 >/proc/sys/kernel/printk # no "reboot: Power down" after COMMAND's output
poweroff -f
EOF
chmod 755 "$root/init"

(cd "$root" && find . | sort | cpio -o -H newc --quiet) >"$tmp/initramfs.cpio"
mkdir -p "$tmp/build"
mv "$tmp/initramfs.cpio" "$tmp/build/"
cp "$kroot/boot/vmlinuz-$kver" "$tmp/build/vmlinuz"
# The uncompressed ELF kernel boots through its PVH entry: no decompression under TCG, 1.5 s
# less per boot. Debian compresses with zstd; run.sh falls back to vmlinuz if this finds nothing.
off=$(LC_ALL=C grep -obUaP '\x28\xb5\x2f\xfd' "$tmp/build/vmlinuz" | head -1 | cut -d: -f1 || true)
if [ -n "$off" ]; then
  tail -c +$((off + 1)) "$tmp/build/vmlinuz" | zstd -dcq >"$tmp/build/vmlinux" 2>/dev/null || true
  if ! readelf -n "$tmp/build/vmlinux" 2>/dev/null | grep -E 'Xen.*(PHYS32_ENTRY|0x00000012)' >/dev/null; then
    rm -f "$tmp/build/vmlinux"
  fi
fi
echo "$kver" >"$tmp/build/version"
echo "$stamp" >"$tmp/build/stamp"
rm -rf "$build"
mv "$tmp/build" "$build"
ln -sfn "${build##*/}" "$cache/current.new"
mv -T "$cache/current.new" "$cache/current"
# Older builds go; a VM already running has its initramfs in memory.
for old in "$cache"/build-* "$cache"/kernel/*; do
  [ "$old" = "$build" ] || [ "$old" = "$kroot" ] || rm -rf "$old"
done
echo "setup: ready: $build ($(du -sh "$build" | cut -f1))" >&2
