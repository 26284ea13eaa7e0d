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

step "S3 bucket answers through boto3"
"$BIN/python" - <<'PY'
import boto3, botocore.config, os
from rbd_restore import config
cfg = config.load(os.environ["RBD_RESTORE_CONFIG"]).s3
s3 = boto3.client("s3", endpoint_url=cfg.endpoint, aws_access_key_id=cfg.access_key,
                  aws_secret_access_key=cfg.secret_key, region_name=cfg.region,
                  config=botocore.config.Config(s3={"addressing_style": "path"}))
s3.put_object(Bucket=cfg.bucket, Key="demo/hello", Body=b"hello from rbd-restore")
print("   ", s3.get_object(Bucket=cfg.bucket, Key="demo/hello")["Body"].read().decode())
PY

step "Done. The cluster keeps running for you:"
echo "   export RBD_RESTORE_CONFIG=$RBD_RESTORE_CONFIG"
echo "   stop it with: make demo-down"
