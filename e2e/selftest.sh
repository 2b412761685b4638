#!/usr/bin/env bash
# Runs e2e/k8s.sh against a fake cluster (stand-in kubectl and helm that keep volumes and
# snapshots as directories), to check the script's own logic without a cluster: with a correct
# fake driver it must pass; it must fail when the restore returns the current data, the group
# restore swaps the members, a snapshot never becomes ready, or a pod shows no data.
# CI runs this; the real run against a cluster is e2e/k8s.sh itself.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/bin"

cat >"$WORK/bin/helm" <<'EOF'
#!/usr/bin/env bash
exit 0
EOF

cat >"$WORK/bin/kubectl" <<'EOF'
#!/usr/bin/env bash
# Fake kubectl: volumes are $STATE/vols/<pvc>, snapshots $STATE/snaps/<name>.
set -euo pipefail
S="$STATE"
mkdir -p "$S/vols" "$S/snaps"
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    -n) shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
set -- "${args[@]}"
claims() { # pod -> "mountdir:pvc ..."
  case "$1" in
    app) echo "data:data" ;;
    app-restore) echo "data:data-restore" ;;
    app-clone) echo "data:data-clone" ;;
    db) echo "data:db-data log:db-log" ;;
    db-restore) echo "data:db-data-restore log:db-log-restore" ;;
    *) echo "unknown pod $1" >&2; exit 1 ;;
  esac
}
copy() { rm -rf "$2"; cp -a "$1" "$2"; }
case "$1" in
  apply)
    file="$3"
    if [ "$file" = - ]; then
      input="$(cat)"
      if grep -q 'kind: Namespace' <<<"$input"; then exit 0; fi
      mapfile -t snaps < <(grep -o 'name: snapshot-[a-z0-9]*' <<<"$input" | cut -d' ' -f2)
      [ "${#snaps[@]}" = 2 ] || { echo "group restore without two member snapshots" >&2; exit 1; }
      if [ "${FAKE_BROKEN:-}" = group ]; then snaps=("${snaps[1]}" "${snaps[0]}"); fi
      copy "$S/snaps/${snaps[0]}" "$S/vols/db-data-restore"
      copy "$S/snaps/${snaps[1]}" "$S/vols/db-log-restore"
      exit 0
    fi
    case "$(basename "$file")" in
      pvc-pod.yaml) mkdir -p "$S/vols/data" ;;
      volumesnapshot.yaml) copy "$S/vols/data" "$S/snaps/data-snap" ;;
      restore.yaml)
        if [ "${FAKE_BROKEN:-}" = restore ]; then copy "$S/vols/data" "$S/vols/data-restore"
        else copy "$S/snaps/data-snap" "$S/vols/data-restore"; fi ;;
      clone.yaml) copy "$S/vols/data" "$S/vols/data-clone" ;;
      group-pvcs-pod.yaml) mkdir -p "$S/vols/db-data" "$S/vols/db-log" ;;
      volumegroupsnapshot.yaml)
        copy "$S/vols/db-data" "$S/snaps/snapshot-0a1b"
        copy "$S/vols/db-log" "$S/snaps/snapshot-2c3d" ;;
      *) echo "fake kubectl: unexpected file $file" >&2; exit 1 ;;
    esac ;;
  exec)
    pod="$2"; cmd="${*: -1}"
    root="$S/pods/$pod"; rm -rf "$root"; mkdir -p "$root"
    for c in $(claims "$pod"); do ln -s "$S/vols/${c#*:}" "$root/${c%%:*}"; done
    cmd="${cmd//\'\/data/\'$root/data}"; cmd="${cmd//\'\/log/\'$root/log}"
    if [ "${FAKE_BROKEN:-}" = empty ]; then exit 0; fi
    sh -c "$cmd" ;;
  wait)
    case "$*" in
      *readyToUse*) [ "${FAKE_BROKEN:-}" != ready ] || { echo "timed out" >&2; exit 1; } ;;
    esac ;;
  get)
    case "$*" in
      *restoreSize*) echo 1Gi ;;
      *volumeGroupSnapshotName*) printf 'db-log snapshot-2c3d\ndb-data snapshot-0a1b\n' ;;
      *copyRate==0*) echo node1-fcmap1 ;;
      *"-o name"*) printf 'flashcopymapping.flashcopy.csi.io/node1-fcmap1\n' ;;
      *) echo "NAME" ;;
    esac ;;
  create) printf 'apiVersion: v1\nkind: Namespace\nmetadata:\n  name: x\n' ;;
  *) exit 0 ;;
esac
EOF
chmod +x "$WORK/bin/helm" "$WORK/bin/kubectl"

run() { # expectation, FAKE_BROKEN
  local want="$1" broken="$2" out rc=0
  out="$(PATH="$WORK/bin:$PATH" STATE="$WORK/state-$broken" FAKE_BROKEN="$broken" \
    KUBECONFIG=/dev/null TIMEOUT=1s bash "$ROOT/e2e/k8s.sh" 2>&1)" || rc=$?
  if [ "$want" = pass ] && { [ "$rc" != 0 ] || ! grep -q '==> PASS' <<<"$out"; }; then
    echo "$out"; echo "selftest: e2e/k8s.sh failed against a correct fake driver" >&2; exit 1
  fi
  if [ "$want" = fail ] && [ "$rc" = 0 ]; then
    echo "$out"; echo "selftest: e2e/k8s.sh passed although the fake driver breaks: $broken" >&2; exit 1
  fi
  echo "ok: ${broken:-correct driver} -> $want ($(grep -m1 -E '^FAIL|==> PASS' <<<"$out" || true))"
}

run pass ""
run fail restore
run fail group
run fail ready
run fail empty
