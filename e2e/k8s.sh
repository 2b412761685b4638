#!/usr/bin/env bash
# End to end on a real cluster (kind, k3s, ...): install the chart, run every example and check
# the data a user relies on:
#   1. a pod writes to a volume; a VolumeSnapshot becomes ReadyToUse;
#   2. the pod overwrites the volume; a volume restored from the snapshot holds the data of
#      before the snapshot, byte for byte;
#   3. a clone holds the volume's data of the moment it was made;
#   4. a VolumeGroupSnapshot of two volumes becomes ReadyToUse with one member per volume;
#      volumes restored from the members hold both volumes' data of before the group snapshot;
#   5. kube-sync mirrors the mappings as FlashCopyMapping objects.
#
#   KUBECONFIG=~/.kube/config e2e/k8s.sh
#
# Environment:
#   KUBECONFIG     required: the cluster to use
#   IMAGE          our image (default flashcopy-csi:0.1.0); build it with `docker build -t $IMAGE .`
#   BUILD=1        build IMAGE with docker first
#   KIND_CLUSTER   load IMAGE into this kind cluster first (kind load docker-image)
#   NAMESPACE      namespace of the examples (default flashcopy-e2e, created and deleted)
#   RELEASE_NS     namespace of the release (default flashcopy-csi)
#   TIMEOUT        kubectl wait timeout per step (default 300s)
#   KEEP=1         keep the examples and the release at the end (for debugging)
#   HELM_ARGS      extra arguments to helm upgrade --install (e.g. "--set snapshotCRDs.install=false")
set -euo pipefail

: "${KUBECONFIG:?set KUBECONFIG to a cluster (kind, k3s, ...)}"
export KUBECONFIG
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
IMAGE="${IMAGE:-flashcopy-csi:0.1.0}"
NAMESPACE="${NAMESPACE:-flashcopy-e2e}"
RELEASE="flashcopy-csi"
RELEASE_NS="${RELEASE_NS:-flashcopy-csi}"
TIMEOUT="${TIMEOUT:-300s}"
EXAMPLES="$ROOT/examples"

log() { printf '\n==> %s\n' "$*"; }
fail() {
  printf 'FAIL: %s\n' "$*" >&2
  diagnose
  exit 1
}
need() { command -v "$1" >/dev/null || { echo "missing $1 on PATH" >&2; exit 2; }; }

k() { kubectl -n "$NAMESPACE" "$@"; }

diagnose() {
  echo "--- diagnostics" >&2
  kubectl -n "$RELEASE_NS" get pods -o wide >&2 || true
  k get pvc,pods -o wide >&2 || true
  k get volumesnapshot,volumegroupsnapshot >&2 || true
  k get events --sort-by=.lastTimestamp 2>/dev/null | tail -n 30 >&2 || true
  kubectl -n "$RELEASE_NS" logs -l app.kubernetes.io/component=controller --all-containers --tail=40 >&2 || true
  kubectl -n "$RELEASE_NS" logs -l app.kubernetes.io/component=node --all-containers --tail=40 >&2 || true
}

cleanup() {
  local rc=$?
  if [ "${KEEP:-0}" = 1 ]; then
    echo "KEEP=1: leaving namespace $NAMESPACE and release $RELEASE_NS/$RELEASE" >&2
    return "$rc"
  fi
  # Volumes first (while the driver still runs), then the release.
  kubectl delete namespace "$NAMESPACE" --ignore-not-found --wait=true --timeout="$TIMEOUT" || true
  helm uninstall "$RELEASE" -n "$RELEASE_NS" --wait --timeout 5m >/dev/null 2>&1 || true
  return "$rc"
}

wait_pod() { k wait --for=condition=Ready "pod/$1" --timeout="$TIMEOUT" || fail "pod $1 not Ready"; }

wait_ready_to_use() {
  k wait --for=jsonpath='{.status.readyToUse}'=true "$1" --timeout="$TIMEOUT" \
    || fail "$1 not ReadyToUse"
}

# Checksums of the files a pod sees under a directory, as "sum name" lines sorted by name.
sums() {
  local out
  out="$(k exec "$1" -- sh -c "cd '$2' && md5sum marker blob | sort -k2")" || fail "cannot read $2 in pod $1"
  [ "$(grep -c ' marker$\| blob$' <<<"$out")" = 2 ] || fail "unexpected checksums of $2 in pod $1: $out"
  printf '%s\n' "$out"
}

# Writes a marker and 8 MiB of random data under a directory of a pod, synced.
write_data() {
  k exec "$1" -- sh -c "echo '$3' > '$2/marker' && dd if=/dev/urandom of='$2/blob' bs=1M count=8 2>/dev/null && sync"
}

same() {
  [ "$2" = "$3" ] || fail "$1: expected
$2
got
$3"
  echo "ok: $1"
}

need kubectl
need helm
trap cleanup EXIT

if [ "${BUILD:-0}" = 1 ]; then
  need docker
  log "docker build -t $IMAGE"
  docker build -t "$IMAGE" "$ROOT"
fi
if [ -n "${KIND_CLUSTER:-}" ]; then
  need kind
  log "kind load docker-image $IMAGE --name $KIND_CLUSTER"
  kind load docker-image "$IMAGE" --name "$KIND_CLUSTER"
fi

log "install the chart ($IMAGE) in $RELEASE_NS"
kubectl create namespace "$RELEASE_NS" --dry-run=client -o yaml | kubectl apply -f -
# The node pod is privileged.
kubectl label namespace "$RELEASE_NS" pod-security.kubernetes.io/enforce=privileged --overwrite
# shellcheck disable=SC2086 # HELM_ARGS is a list of words on purpose
helm upgrade --install "$RELEASE" "$ROOT/charts/flashcopy-csi" \
  --namespace "$RELEASE_NS" \
  --set image.repository="${IMAGE%:*}" --set image.tag="${IMAGE##*:}" \
  --wait --timeout 10m ${HELM_ARGS:-}
for crd in volumesnapshots.snapshot.storage.k8s.io volumegroupsnapshots.groupsnapshot.storage.k8s.io \
  flashcopymappings.flashcopy.csi.io flashcopyconsistencygroups.flashcopy.csi.io; do
  kubectl wait --for=condition=Established "crd/$crd" --timeout=60s || fail "CRD $crd missing"
done
kubectl -n "$RELEASE_NS" rollout status "daemonset/$RELEASE-node" --timeout="$TIMEOUT"
kubectl -n "$RELEASE_NS" rollout status "deployment/$RELEASE-controller" --timeout="$TIMEOUT"
kubectl get csidriver flashcopy.csi.io >/dev/null || fail "CSIDriver flashcopy.csi.io missing"

kubectl create namespace "$NAMESPACE" --dry-run=client -o yaml | kubectl apply -f -

log "1. PVC + pod, write, VolumeSnapshot"
k apply -f "$EXAMPLES/pvc-pod.yaml"
wait_pod app
write_data app /data before-snapshot
before="$(sums app /data)"
k apply -f "$EXAMPLES/volumesnapshot.yaml"
wait_ready_to_use volumesnapshot/data-snap
size="$(k get volumesnapshot data-snap -o jsonpath='{.status.restoreSize}')"
[ -n "$size" ] || fail "data-snap has no restoreSize"
echo "ok: data-snap ReadyToUse, restoreSize $size"

log "2. overwrite the source, restore the snapshot"
write_data app /data after-snapshot
after="$(sums app /data)"
[ "$before" != "$after" ] || fail "overwriting did not change the data"
k apply -f "$EXAMPLES/restore.yaml"
wait_pod app-restore
same "restore holds the data of before the snapshot" "$before" "$(sums app-restore /data)"
same "the source keeps its new data" "$after" "$(sums app /data)"

log "3. clone"
k apply -f "$EXAMPLES/clone.yaml"
wait_pod app-clone
same "clone holds the source's current data" "$after" "$(sums app-clone /data)"

log "4. VolumeGroupSnapshot of two volumes, restore of both members"
k apply -f "$EXAMPLES/group-pvcs-pod.yaml"
wait_pod db
write_data db /data group-data
write_data db /log group-log
group_data="$(sums db /data)"
group_log="$(sums db /log)"
k apply -f "$EXAMPLES/volumegroupsnapshot.yaml"
wait_ready_to_use volumegroupsnapshot/db-snap
members="$(k get volumesnapshot -o jsonpath='{range .items[?(@.status.volumeGroupSnapshotName=="db-snap")]}{.spec.source.persistentVolumeClaimName}{" "}{.metadata.name}{"\n"}{end}')"
echo "$members"
data_snap="$(awk '$1 == "db-data" {print $2}' <<<"$members")"
log_snap="$(awk '$1 == "db-log" {print $2}' <<<"$members")"
if [ -z "$data_snap" ] || [ -z "$log_snap" ]; then
  fail "db-snap members: want one for db-data and one for db-log"
fi
wait_ready_to_use "volumesnapshot/$data_snap"
wait_ready_to_use "volumesnapshot/$log_snap"
write_data db /data group-data-after
write_data db /log group-log-after
sed -e "s/\${DB_DATA_SNAPSHOT}/$data_snap/" -e "s/\${DB_LOG_SNAPSHOT}/$log_snap/" \
  "$EXAMPLES/group-restore.yaml" | k apply -f -
wait_pod db-restore
same "group restore: data volume" "$group_data" "$(sums db-restore /data)"
same "group restore: log volume" "$group_log" "$(sums db-restore /log)"

log "5. FlashCopy objects mirrored by kube-sync"
kubectl get flashcopymappings,flashcopyconsistencygroups
maps="$(kubectl get flashcopymappings -o name | wc -l)"
[ "$maps" -ge 1 ] || fail "no FlashCopyMapping objects (kube-sync)"
echo "ok: $maps FlashCopyMapping objects"
snapshots="$(kubectl get flashcopymappings -o jsonpath='{range .items[?(@.status.copyRate==0)]}{.metadata.name}{"\n"}{end}')"
[ -n "$snapshots" ] || fail "no copy-rate-0 mapping (a snapshot) among the FlashCopyMapping objects"
echo "ok: snapshot mappings: $(echo "$snapshots" | tr '\n' ' ')"

log "PASS"
