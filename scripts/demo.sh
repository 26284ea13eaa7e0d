#!/usr/bin/env bash
# The rbd-restore story on the embedded cluster, step by step with timings.
# Run through `make demo`, which installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR=${DEMO_DIR:-$PWD/.demo}
BIN=$PWD/.venv/bin
RR="$BIN/rbd-restore"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
now() { date +%s%3N; }
took() { local ms=$(($(now) - $1)); printf '   (%d.%01d s)\n' $((ms / 1000)) $((ms % 1000 / 100)); }

# The newest backup of the demo image and the digest of its snapshot.
newest_backup() {
  BACKUP=$("$RR" backups list --image "volumes/$IMG" --json | "$BIN/python" -c \
    'import json, sys; print(json.load(sys.stdin)["backups"][-1]["backup_id"])')
  SUM=$(rbd -c "$CONF" export "volumes/$IMG@rbd-restore.$BACKUP" - 2>/dev/null | sha256sum |
    cut -c1-16)
}

step "Embedded cluster in $DEMO_DIR: mon, mgr, memstore OSD, RGW (S3) on 127.0.0.1"
t=$(now)
"$RR" dev up --dir "$DEMO_DIR/cluster"
took "$t"
export RBD_RESTORE_CONFIG="$DEMO_DIR/cluster/rbd-restore.toml"
CONF="$DEMO_DIR/cluster/ceph.conf"
ceph -c "$CONF" -s

step "A 1 GiB volume in pool 'volumes' with 64 MiB of data"
IMG="demo-$(date +%s)"
t=$(now)
rbd -c "$CONF" create --size 1G "volumes/$IMG"
rbd -c "$CONF" bench --io-type write --io-size 4M --io-total 64M --io-pattern rand "volumes/$IMG" \
  >/dev/null
rbd -c "$CONF" du "volumes/$IMG"
took "$t"

step "Back it up to S3: snapshot, changed extents only, deduplicated zstd chunks"
t=$(now)
"$RR" backup "volumes/$IMG"
took "$t"
newest_backup
echo "   content sha256 $SUM..."

step "Write 8 MiB more, back up again: incremental, only the changed chunks travel"
rbd -c "$CONF" bench --io-type write --io-size 4M --io-total 8M --io-pattern rand "volumes/$IMG" \
  >/dev/null
t=$(now)
"$RR" backup "volumes/$IMG"
took "$t"
newest_backup
"$RR" backups verify "$BACKUP" --deep

step "Disaster: the volume is deleted"
rbd -c "$CONF" snap purge "volumes/$IMG" >/dev/null 2>&1
rbd -c "$CONF" rm "volumes/$IMG" >/dev/null 2>&1
echo "   volumes/$IMG removed"

step "Full restore of $BACKUP (every chunk verified before it is written)"
t=$(now)
"$RR" restore "$BACKUP" "volumes/$IMG" --mode full
took "$t"
GOT=$(rbd -c "$CONF" export "volumes/$IMG" - 2>/dev/null | sha256sum | cut -c1-16)
echo "   restored sha256 $GOT... (backup $SUM...)"
[ "$GOT" = "$SUM" ] && echo "   identical" || { echo "   MISMATCH"; exit 1; }
rbd -c "$CONF" du "volumes/$IMG"

step "The fetcher serves the backup as a qcow2 file over HTTP (verified chunks, cached)"
"$RR" fetcher serve --log-level warning 2>"$DEMO_DIR/fetcher.log" &
FETCHER_PID=$!
trap 'kill "$FETCHER_PID" 2>/dev/null || true' EXIT
until grep -q "fetcher ready" "$DEMO_DIR/fetcher.log" 2>/dev/null; do
  kill -0 "$FETCHER_PID" 2>/dev/null || { cat "$DEMO_DIR/fetcher.log"; exit 1; }
  sleep 0.1
done
URL=$("$RR" fetcher session create "$BACKUP" --json | "$BIN/python" -c \
  'import json, sys; print(json.load(sys.stdin)["url"])')
echo "   session URL: ${URL:0:60}..."
qemu-img info "$URL" | sed -n '2,5p;/cluster_size/p' | sed 's/^/   /'
t=$(now)
qemu-img compare -f qcow2 -F raw "$URL" "rbd:volumes/$IMG:conf=$CONF" | sed 's/^/   /'
took "$t"

step "Done. The cluster keeps running for you:"
echo "   export RBD_RESTORE_CONFIG=$RBD_RESTORE_CONFIG"
echo "   stop it with: make demo-down"
