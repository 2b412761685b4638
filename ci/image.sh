#!/usr/bin/env bash
# Checks the image the Dockerfile builds, where no container engine runs (none does on CI
# machines): debootstraps the Debian release of the Dockerfile's final stage, installs the
# packages its RUN line names (read from the Dockerfile, so the two cannot drift), puts our binary
# where its COPY puts it, and then, chrooted, with only the image's own tools on PATH:
#   - runs the ENTRYPOINT (`--version`) and README's main job (`standalone --demo`);
#   - finds every tool the node plugin runs (mkfs, mount, blkid, losetup, nbdfuse, modprobe...);
#   - runs the CSI node tests (tests/csi_node.rs, CI=true: a missing tool fails, never skips):
#     nbdfuse + loop attach, ext4 and xfs made and grown, bind mounts, stats.
# The build stage is the same `cargo build --locked` on the same Debian release that CI runs.
#
#   ci/image.sh [--release]     # debug build by default (what `cargo test` built)
set -euo pipefail
cd "$(dirname "$0")/.."

profile=()
[ "${1:-}" = --release ] && profile=(--release)

# The Dockerfile's final stage, continuation lines joined.
final=$(awk '/^FROM /{buf=""} {buf=buf $0 "\n"} END{printf "%s", buf}' Dockerfile |
  sed -e ':a' -e '/\\$/N; s/\\\n//; ta')
from=$(printf '%s\n' "$final" | awk '/^FROM /{print $2; exit}')
while [[ $from =~ \$\{([A-Z_]+)\} ]]; do
  var=${BASH_REMATCH[1]}
  val=$(sed -n "s/^ARG $var=//p" Dockerfile)
  [ -n "$val" ] || { echo "Dockerfile: ARG $var has no default" >&2; exit 1; }
  from=${from//"\${$var}"/$val}
done
[[ $from =~ ^debian:([a-z]+)(-slim)?$ ]] || {
  echo "ci/image.sh knows debian:<release>[-slim] bases, the Dockerfile's final stage is $from" >&2
  exit 1
}
release=${BASH_REMATCH[1]}
packages=$(printf '%s\n' "$final" | grep -oP 'apt-get install\s+(-\S+\s+)*\K[^&]+' | xargs)
dest=$(printf '%s\n' "$final" | grep -oP '^COPY --from=\S+ \S+ \K\S+')
entry=$(printf '%s\n' "$final" | grep -oP '^ENTRYPOINT \["\K[^"]+')
if [ -z "$packages" ] || [ -z "$dest" ]; then
  echo "Dockerfile: no apt-get install or COPY in the final stage" >&2
  exit 1
fi
[ "$entry" = "$dest" ] || { echo "Dockerfile: ENTRYPOINT $entry is not the copied binary $dest" >&2; exit 1; }
echo "image: FROM $from; packages: $packages; binary at $dest"

# Our binary and the node tests, as cargo built them (the tests run the binary at its build path).
read -r bin tests < <(cargo test --locked "${profile[@]}" --test csi_node --no-run --message-format=json 2>/dev/null |
  python3 -c '
import json, sys
exe = {}
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        exe[(m["target"]["name"], m["target"]["kind"][0])] = m["executable"]
print(exe[("flashcopy-csi", "bin")], exe[("csi_node", "test")])')

work=$(mktemp -d /var/tmp/flashcopy-image.XXXXXX)
root=$work/rootfs
cleanup() {
  for m in sys dev proc; do
    mountpoint -q "$root/$m" && umount -R "$root/$m"
  done
  # --one-file-system: never follow a mount that failed to go away into the host's /dev.
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT

echo "== debootstrap $release (minbase, like -slim)"
debootstrap --variant=minbase "$release" "$root" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 ||
  { tail -20 "$work/debootstrap.log"; exit 1; }
mount --bind /proc "$root/proc"
mount --rbind /dev "$root/dev"
mount --make-rslave "$root/dev"
mount --rbind /sys "$root/sys"
mount --make-rslave "$root/sys"
in_image() { chroot "$root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root "$@"; }
apt_install() {
  in_image sh -c "DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $* >/dev/null"
}

echo "== the Dockerfile's packages"
apt_install "$packages"
install -D -m 0755 "$bin" "$root$dest"

echo "== ENTRYPOINT and the main job"
in_image "$dest" --version
in_image "$dest" standalone --data-dir /tmp/demo --demo >"$work/demo.log" 2>&1 ||
  { cat "$work/demo.log"; echo "standalone --demo failed in the image" >&2; exit 1; }
grep -F 'Done.' "$work/demo.log"

echo "== the tools the node plugin runs"
missing=()
for tool in blkid mkfs.ext4 mkfs.xfs mount umount resize2fs xfs_growfs losetup nbdfuse fusermount3 modprobe; do
  in_image sh -c "command -v $tool" >/dev/null || missing+=("$tool")
done
[ ${#missing[@]} -eq 0 ] || { echo "not in the image: ${missing[*]}" >&2; exit 1; }
echo "all present"

echo "== the CSI node tests inside the image"
# Test-harness only, not in the image: the tests signal processes with kill(1).
apt_install procps
install -D -m 0755 "$tests" "$root/csi_node"
mkdir -p "$(dirname "$root$bin")"
ln -sf "$dest" "$root$bin"
in_image CI=true /csi_node --test-threads=2
