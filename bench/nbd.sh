#!/usr/bin/env bash
# NBD data path against its peers (docs BENCHMARKS.md): our agent, qemu-nbd and nbdkit serve the
# SAME backing file (our source volume's file) and fio's nbd engine drives each in turn; then
# copy-on-write after a snapshot: a FlashCopy mapping (copy rate 0) against a qcow2 overlay
# under qemu-nbd and nbdkit's cow filter. Prints medians and ratios as markdown tables.
#
#   bench/nbd.sh                      # tmpfs (/dev/shm), about 6 minutes
#   bench/nbd.sh --dir /var/tmp       # a disk file system (qemu-nbd: cache=none, aio=native)
#
# Peers (Debian): fio, qemu-utils, nbdkit, python3.
set -euo pipefail

usage() {
  cat <<EOF
usage: $0 [options]
  --dir DIR       where the backing files go; tmpfs or a disk directory [default: /dev/shm]
  --size SIZE     volume size (1G, 512M, ...) [default: 1G]
  --runtime SEC   measured seconds of each time-based row [default: 5]
  --ramp SEC      ramp seconds before each time-based row [default: 1]
  --reps N        repetitions of each row; the median is printed [default: 3]
  --grain KIB     grain / qcow2 cluster / cow block size, 64 or 256 [default: 64]
  --passes N      passes over every grain in the rewrite rows [default: 3]
  --bin PATH      use this flashcopy-csi binary instead of building target/release
  --raw FILE      also write the per-run results (tab-separated) to FILE
EOF
}

DIR=/dev/shm SIZE=1G RUNTIME=5 RAMP=1 REPS=3 GRAIN=64 PASSES=3 BIN="" RAW_OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --runtime) RUNTIME=$2; shift 2 ;;
    --ramp) RAMP=$2; shift 2 ;;
    --reps) REPS=$2; shift 2 ;;
    --grain) GRAIN=$2; shift 2 ;;
    --passes) PASSES=$2; shift 2 ;;
    --bin) BIN=$2; shift 2 ;;
    --raw) RAW_OUT=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done

die() {
  echo "nbd.sh: $*" >&2
  [ ! -s "${W:-}/servers.log" ] || { echo "--- servers.log (tail)" >&2; tail -20 "$W/servers.log" >&2; }
  exit 1
}
for tool in fio qemu-nbd qemu-img nbdkit python3; do
  command -v "$tool" >/dev/null || die "$tool is missing (Debian: fio, qemu-utils, nbdkit, python3)"
done
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine"
[ -d "$DIR" ] || die "--dir $DIR is not a directory"
case "$GRAIN" in 64|256) ;; *) die "--grain must be 64 or 256" ;; esac
BYTES=$(numfmt --from=iec "${SIZE%B}" 2>/dev/null) || die "--size $SIZE is not a size"
GB=$((GRAIN * 1024))
[ $((BYTES % (1 << 20))) -eq 0 ] && [ "$BYTES" -gt 0 ] || die "--size must be a multiple of 1 MiB"
[ $((BYTES % GB)) -eq 0 ] || die "--size must be a multiple of the grain"

ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "$BIN" ]; then
  (cd "$ROOT" && cargo build --release --quiet)
  BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/flashcopy-csi
fi
[ -x "$BIN" ] || die "$BIN is not executable"

if [ "$(stat -f -c %T "$DIR")" = tmpfs ]; then
  FS=tmpfs QCACHE=(--cache=writeback --aio=threads)
else
  FS=disk QCACHE=(--cache=none --aio=native)
fi

W=$(mktemp -d "$DIR/fc-nbd-bench.XXXXXX")
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$W"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Starts a server in the background; $SPID is its pid once socket $1 accepts connections.
start() {
  local sock=$1; shift
  "$@" >>"$W/servers.log" 2>&1 &
  SPID=$!
  PIDS+=("$SPID")
  for _ in $(seq 200); do
    [ -S "$sock" ] && return 0
    kill -0 "$SPID" 2>/dev/null || break
    sleep 0.05
  done
  tail -20 "$W/servers.log" >&2
  die "$1 did not come up on $sock"
}
stop() {
  local p=$1 keep=() q
  kill "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
  for q in "${PIDS[@]}"; do [ "$q" = "$p" ] || keep+=("$q"); done
  PIDS=("${keep[@]}")
}

# --- our agent and the source volume; its file is the backing file of every peer -------------
A=$W/agent
start "$A/agent.sock" "$BIN" agent --data-dir "$A"
AGENT_PID=$SPID
while [ ! -S "$A/nbd.sock" ]; do sleep 0.05; done
fc() { "$BIN" fc --agent "unix://$A/agent.sock" "$@" >>"$W/fc.log" 2>&1 || { tail -5 "$W/fc.log" >&2; die "fc $* failed"; }; }
fc mkvol src "$BYTES"
shopt -s nullglob
imgs=("$A"/volumes/*.img)
[ ${#imgs[@]} -eq 1 ] || die "expected one volume file in $A/volumes"
F=${imgs[0]}
# Allocated and full of data, as a used volume is (seq read and copy-on-write read it back).
fio --name=fill --filename="$F" --rw=write --bs=1M --ioengine=psync --size="$BYTES" \
  --end_fsync=1 --output=/dev/null

# Replay logs: every grain once in a random order (fio's random map cannot do it for
# I/O smaller than its alignment), and the same offsets again PASSES times.
python3 - "$BYTES" "$GB" "$PASSES" "$W" <<'EOF'
import random, sys
size, gb, passes, w = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
grains = list(range(size // gb))
random.Random(1).shuffle(grains)
for name, n in (("first", 1), ("rewrite", passes)):
    with open(f"{w}/{name}.iolog", "w") as f:
        f.write("fio version 2 iolog\nnbd add\nnbd open\n")
        for _ in range(n):
            f.writelines(f"nbd write {g * gb} 4096\n" for g in grains)
        f.write("nbd close\n")
EOF

RESULTS=$W/results.tsv
: >"$RESULTS"
# run ROW SERVER URI FIO-ARGS...: one fio run, appended to the results as MiB/s and IOPS.
# $ENSURE (if set) runs first. A failed run is fatal for ours; a peer's is reported and skipped.
ENSURE=""
run() {
  local row=$1 server=$2 uri=$3; shift 3
  local out=$W/fio.json
  if [ -n "$ENSURE" ] && ! $ENSURE; then
    echo "  $row on $server: not measured" >&2
    return 0
  fi
  if ! fio --name="$row" --ioengine=nbd --uri="$uri" --output-format=json --output="$out" \
    "$@" >>"$W/fio.log" 2>&1; then
    tail -3 "$W/fio.log" >&2
    [ "$server" != ours ] || die "fio $row on $server failed"
    echo "  $row on $server failed: not counted" >&2
    return 0
  fi
  python3 - "$out" "$row" "$server" >>"$RESULTS" <<'EOF'
import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
if job["error"]:
    sys.exit(f"fio {sys.argv[2]} on {sys.argv[3]}: error {job['error']}")
d = max((job["read"], job["write"]), key=lambda d: d["total_ios"])
print(f"{sys.argv[2]}\t{sys.argv[3]}\t{d['bw_bytes'] / 2**20:.1f}\t{d['iops']:.0f}")
EOF
  printf '  %-12s %-12s %s\n' "$row" "$server" "$(tail -1 "$RESULTS" | cut -f3,4 | sed 's/\t/ MiB\/s  /') IOPS" >&2
}

TIMED=(--time_based --runtime="$RUNTIME" --ramp_time="$RAMP")
# One pass, with a generous time cap so that a stuck server cannot hang the script.
PASS=(--runtime=$((RUNTIME * 20)))
REPLAY=(--replay_no_stall=1 --iodepth=16)
rows_plain() { # SERVER URI
  run seq-write "$1" "$2" "${TIMED[@]}" --rw=write --bs=1M --iodepth=4
  run seq-read "$1" "$2" "${TIMED[@]}" --rw=read --bs=1M --iodepth=4
  run rand-write-1 "$1" "$2" "${TIMED[@]}" --rw=randwrite --bs=4k --iodepth=1
  run rand-write-16 "$1" "$2" "${TIMED[@]}" --rw=randwrite --bs=4k --iodepth=16
  run rand-read-16 "$1" "$2" "${TIMED[@]}" --rw=randread --bs=4k --iodepth=16
  run grain-write-16 "$1" "$2" "${PASS[@]}" "${REPLAY[@]}" --read_iolog="$W/rewrite.iolog"
}
# rows_cow SETUP TEARDOWN SERVER URI: two fresh snapshots, one for the random rows, one for
# the sequential rows (the random pass copies every grain).
rows_cow() {
  local setup=$1 teardown=$2 server=$3 uri=$4 check=$5
  $setup
  run cow-rand-first "$server" "$uri" "${PASS[@]}" "${REPLAY[@]}" --read_iolog="$W/first.iolog"
  ENSURE="$check" run cow-rand-rewrite "$server" "$uri" "${PASS[@]}" "${REPLAY[@]}" \
    --read_iolog="$W/rewrite.iolog"
  $teardown
  $setup
  run cow-seq-first "$server" "$uri" "${PASS[@]}" --rw=write --bs=1M --iodepth=4 --size="$BYTES"
  ENSURE="$check" run cow-seq-rewrite "$server" "$uri" "${TIMED[@]}" --rw=write --bs=1M --iodepth=4
  $teardown
}

OURS="nbd+unix:///src?socket=$A/nbd.sock"
QEMU="nbd+unix:///?socket=$W/qemu.sock"
KIT="nbd+unix:///?socket=$W/nbdkit.sock"
QCOW="nbd+unix:///?socket=$W/qcow2.sock"
COW="nbd+unix:///?socket=$W/cow.sock"

# A peer's overlay dies with its server: the rewrite rows then cannot be measured.
overlay_alive() {
  kill -0 "${!1}" 2>/dev/null || { echo "  the overlay's server exited" >&2; return 1; }
}
cow_ours_up() {
  fc mkvol snap "$BYTES"
  fc mkfcmap --source src --target snap --name snap --copyrate 0 --grainsize "$GRAIN"
  fc startfcmap --prep snap
}
cow_ours_down() { fc stopfcmap --force snap; fc rmfcmap --force snap; fc rmvol snap; }
cow_qcow2_up() {
  qemu-img create -q -f qcow2 -o cluster_size="$GB" -b "$F" -F raw "$W/overlay.qcow2"
  start "$W/qcow2.sock" qemu-nbd -f qcow2 -k "$W/qcow2.sock" -t "${QCACHE[@]}" -e 4 "$W/overlay.qcow2"
  QCOW_PID=$SPID
}
cow_qcow2_down() { stop "$QCOW_PID"; rm -f "$W/overlay.qcow2" "$W/qcow2.sock"; }
cow_kit_up() {
  # The cow filter keeps its overlay in TMPDIR: the same file system as the others.
  start "$W/cow.sock" env TMPDIR="$W" nbdkit -U "$W/cow.sock" -f --filter=cow file "$F" \
    cow-block-size="$GB"
  COW_PID=$SPID
}
cow_kit_down() { stop "$COW_PID"; rm -f "$W/cow.sock"; }

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
T0=$(date +%s)
echo "nbd.sh: $FS ($DIR), $SIZE, ${RAMP}s ramp + ${RUNTIME}s per timed row, $REPS reps, ${GRAIN} KiB grains" >&2

# --- without a snapshot: the three servers on the same file, interleaved ------------------------
qemu_up() {
  start "$W/qemu.sock" qemu-nbd -f raw -k "$W/qemu.sock" -t "${QCACHE[@]}" -e 4 "$F"
  QEMU_PID=$SPID
}
kit_up() {
  start "$W/nbdkit.sock" nbdkit -U "$W/nbdkit.sock" -f file "$F"
  KIT_PID=$SPID
}
# A peer that died (nbdkit 1.32 aborts now and then when a client disconnects) is restarted
# before its next rows, and the fact is reported.
alive() { # PID-VARIABLE NAME UP-FUNCTION
  kill -0 "${!1}" 2>/dev/null && return 0
  echo "  $2 exited; restarting it" >&2
  stop "${!1}"
  rm -f "$W/$2.sock"
  $3
}
qemu_up
kit_up
for rep in $(seq "$REPS"); do
  echo "rep $rep/$REPS: no snapshot" >&2
  order=(ours qemu-nbd nbdkit)
  for i in 0 1 2; do
    case ${order[$(((i + rep - 1) % 3))]} in
      ours) rows_plain ours "$OURS" ;;
      qemu-nbd) ENSURE="alive QEMU_PID qemu qemu_up" rows_plain qemu-nbd "$QEMU" ;;
      nbdkit) ENSURE="alive KIT_PID nbdkit kit_up" rows_plain nbdkit "$KIT" ;;
    esac
  done
done
# qemu's overlay opens the file as its backing image, which the raw qemu-nbd's lock forbids.
stop "$QEMU_PID"
stop "$KIT_PID"

# --- copy-on-write after a snapshot -------------------------------------------------------
for rep in $(seq "$REPS"); do
  echo "rep $rep/$REPS: copy-on-write" >&2
  order=(ours qcow2 cow)
  for i in 0 1 2; do
    case ${order[$(((i + rep - 1) % 3))]} in
      ours) rows_cow cow_ours_up cow_ours_down ours "$OURS" "" ;;
      qcow2) rows_cow cow_qcow2_up cow_qcow2_down qcow2 "$QCOW" "overlay_alive QCOW_PID" ;;
      cow) rows_cow cow_kit_up cow_kit_down nbdkit-cow "$COW" "overlay_alive COW_PID" ;;
    esac
  done
done
stop "$AGENT_PID"
[ -z "$RAW_OUT" ] || cp "$RESULTS" "$RAW_OUT"

# --- the tables -------------------------------------------------------------------------------
python3 - "$RESULTS" <<EOF
import statistics, sys
med = {}
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
for row, server in {(r[0], r[1]) for r in rows}:
    runs = [r for r in rows if r[0] == row and r[1] == server]
    med[row, server] = (statistics.median(float(r[2]) for r in runs),
                        statistics.median(float(r[3]) for r in runs))

def cell(row, server):
    m = med.get((row, server))
    return "–" if m is None else f"{m[0]:.0f} MiB/s, {m[1]:.0f}"

def ratio(a, b):
    x, y = med.get(a), med.get(b)
    return "–" if not x or not y or not y[1] else f"{x[1] / y[1]:.2f}x"

print("## NBD: $FS ($DIR), $SIZE backing file, medians of $REPS, fio nbd engine, one connection")
print()
print("Load average at start $LOAD_START, at end $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) CPUs; "
      "$(($(date +%s) - T0)) s. Cells: MiB/s, IOPS.")
print()
print("| row | ours | qemu-nbd | nbdkit file | ours/qemu-nbd | ours/nbdkit |")
print("|---|---|---|---|---|---|")
plain = [("seq-write", "seq write 1 MiB QD4"), ("seq-read", "seq read 1 MiB QD4"),
         ("rand-write-1", "rand write 4 KiB QD1"), ("rand-write-16", "rand write 4 KiB QD16"),
         ("rand-read-16", "rand read 4 KiB QD16"),
         ("grain-write-16", "write 4 KiB QD16, one per grain ×$PASSES (rewrite pattern)")]
for row, label in plain:
    print(f"| {label} | {cell(row, 'ours')} | {cell(row, 'qemu-nbd')} | {cell(row, 'nbdkit')} | "
          f"{ratio((row, 'ours'), (row, 'qemu-nbd'))} | {ratio((row, 'ours'), (row, 'nbdkit'))} |")
print()
print("Copy-on-write after a snapshot (ours: FlashCopy mapping, copy rate 0; $GRAIN KiB grains, "
      "qcow2 clusters and cow blocks). First = each grain written once (random order for 4 KiB); "
      "rewrite = the same offsets again. Last column: ours against our own row without a snapshot.")
print()
print("| row | ours | qcow2 overlay | nbdkit cow | ours/qcow2 | ours/nbdkit-cow | ours vs no snapshot |")
print("|---|---|---|---|---|---|---|")
cow = [("cow-rand-first", "first write 4 KiB QD16", None),
       ("cow-rand-rewrite", "rewrite 4 KiB QD16", "grain-write-16"),
       ("cow-seq-first", "first write 1 MiB QD4 (seq)", None),
       ("cow-seq-rewrite", "rewrite 1 MiB QD4 (seq)", "seq-write")]
for row, label, base in cow:
    own = ratio((row, "ours"), (base, "ours")) if base else "–"
    print(f"| {label} | {cell(row, 'ours')} | {cell(row, 'qcow2')} | {cell(row, 'nbdkit-cow')} | "
          f"{ratio((row, 'ours'), (row, 'qcow2'))} | {ratio((row, 'ours'), (row, 'nbdkit-cow'))} | {own} |")
print()
print(f"Rewrite 4 KiB QD16 against plain random write QD16 (ours): "
      f"{ratio(('cow-rand-rewrite', 'ours'), ('rand-write-16', 'ours'))}")
EOF
