#!/usr/bin/env bash
# The rbd-restore story on the embedded cluster, step by step with timings:
# a guest disk is backed up to S3 and deleted, restored instantly, booted under
# QEMU while its data arrives on demand, relocated and committed; then the same
# with a full restore, for comparison. Run through `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR=${DEMO_DIR:-$PWD/.demo}
BIN=$PWD/.venv/bin
RR="$BIN/rbd-restore"
mkdir -p "$DEMO_DIR"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
now() { date +%s%3N; }
secs() { local ms=$(($(now) - $1)); printf '%d.%01d' $((ms / 1000)) $((ms % 1000 / 100)); }
json() { "$BIN/python" -c "import json, sys; print(json.load(sys.stdin)$1)"; }

PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

# Boot the guest on an rbd: drive; print seconds to the marker line, check its checksums.
boot() {
  local image=$1 console="$DEMO_DIR/$1.console" t
  rm -f "$console"
  t=$(now)
  qemu-system-x86_64 -accel tcg -m 512 -display none -no-reboot -monitor none \
    -serial "file:$console" -kernel "$GUEST/vmlinuz" -initrd "$GUEST/initrd.img" \
    -append "console=ttyS0 quiet panic=-1" \
    -drive "file=rbd:volumes/$image:conf=$CONF,format=raw,if=virtio,cache=writeback" &
  local qemu=$!
  until grep -q RBD-RESTORE-GUEST-BOOTED "$console" 2>/dev/null; do
    kill -0 "$qemu" 2>/dev/null || { echo "   QEMU exited early"; tail "$console"; exit 1; }
    sleep 0.1
  done
  BOOT_SECONDS=$(secs "$t")
  "$BIN/python" - "$console" "$GUEST/guest.json" <<'PY'
import json, sys
want = json.load(open(sys.argv[2]))["sums"]
got = {l.split()[2]: l.split()[1] for l in open(sys.argv[1], errors="replace")
       if l.startswith("RBD-RESTORE-GUEST-SUM ")}
print(f"   guest read {len(got)} files, checksums {'match' if got == want else 'DIFFER'}")
sys.exit(got != want)
PY
  wait "$qemu"
  echo "   booted (marker seen) in $BOOT_SECONDS s; the guest wrote a file and powered off"
}

step "Embedded cluster in $DEMO_DIR: mon, mgr, memstore OSD, RGW (S3) on 127.0.0.1"
t=$(now)
"$RR" dev up --dir "$DEMO_DIR/cluster"
echo "   ($(secs "$t") s)"
export RBD_RESTORE_CONFIG="$DEMO_DIR/cluster/rbd-restore.toml"
CONF="$DEMO_DIR/cluster/ceph.conf"

step "Test guest: Debian's kernel, busybox and a 48 MiB data set on a 1 GiB ext4 disk"
"$BIN/python" scripts/build-guest.py
GUEST=$PWD/.cache/guest
IMG="vm-$(date +%s)"
rbd -c "$CONF" import --no-progress "$GUEST/root.img" "volumes/$IMG"
rbd -c "$CONF" du "volumes/$IMG" | sed 's/^/   /'

step "Back it up to S3: snapshot, allocated extents only, deduplicated zstd chunks"
t=$(now)
BACKUP=$("$RR" backup "volumes/$IMG" --json | json '["backup_id"]')
echo "   backup $BACKUP in $(secs "$t") s"
"$RR" backups verify "$BACKUP" --deep | sed 's/^/   /'

step "Disaster: the volume is deleted"
rbd -c "$CONF" snap purge "volumes/$IMG" >/dev/null 2>&1
rbd -c "$CONF" rm --no-progress "volumes/$IMG"
echo "   volumes/$IMG removed"

step "Fetcher (serves backups to librbd as qcow2) and job runner (relocates, commits)"
"$RR" fetcher serve --log-level warning 2>"$DEMO_DIR/fetcher.log" &
PIDS+=($!)
until grep -q "fetcher ready" "$DEMO_DIR/fetcher.log" 2>/dev/null; do sleep 0.1; done
"$RR" jobs run --log-level warning 2>"$DEMO_DIR/runner.log" &
PIDS+=($!)
echo "   running"

step "Instant restore of $BACKUP into volumes/$IMG"
t0=$(now)
JOB=$("$RR" restore "$BACKUP" "volumes/$IMG" --mode instant --json | json '["job_id"]')
READY=$(secs "$t0")
echo "   ready to boot after $READY s (job $JOB)"
rbd -c "$CONF" status "volumes/$IMG" | sed 's/^/   /' | cut -c1-100

step "Boot the VM on the restored image while its data arrives on demand"
boot "$IMG"
INSTANT_TOTAL=$(secs "$t0")

step "Relocation and commit: the image becomes an ordinary RBD image"
until "$RR" status "$JOB" --json | json '["jobs"][0]["state"]' | grep -qE 'committed|failed'; do
  sleep 0.2
done
"$RR" status "$JOB" | sed 's/^/   /'
rbd -c "$CONF" du "volumes/$IMG" | sed 's/^/   /'
rbd -c "$CONF" export --no-progress "volumes/$IMG" "$DEMO_DIR/check.img" >/dev/null
echo "   the guest's own write survived: $(debugfs -R 'cat /written-by-guest' \
  "$DEMO_DIR/check.img" 2>/dev/null | tail -1)"
rm -f "$DEMO_DIR/check.img"

step "For comparison: full restore, then boot"
t1=$(now)
"$RR" restore "$BACKUP" "volumes/$IMG-full" --mode full | sed 's/^/   /'
FULL_RESTORE=$(secs "$t1")
boot "$IMG-full"
FULL_TOTAL=$(secs "$t1")

step "Summary"
printf '   %-38s %s s\n' "instant restore: ready to boot" "$READY" \
  "instant restore: booted (from start)" "$INSTANT_TOTAL" \
  "full restore: copy" "$FULL_RESTORE" \
  "full restore: booted (from start)" "$FULL_TOTAL"
echo "   The cluster keeps running: export RBD_RESTORE_CONFIG=$RBD_RESTORE_CONFIG"
echo "   stop it with: make demo-down"
