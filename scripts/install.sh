#!/usr/bin/env bash
# Install what rbd-restore needs on Debian 12, idempotently:
#   - Debian packages: Ceph daemons and bindings, QEMU, kernel and busybox for the test guest,
#     mmdebstrap for the Debian test guest, HAProxy for the fetcher-replica tests;
#   - a virtualenv in .venv from /usr/bin/python3 with --system-site-packages (rados and rbd
#     exist only as Debian packages for that interpreter) and the package in editable mode.
# A second run on a set-up machine checks and returns in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  ceph-mon ceph-osd ceph-mgr radosgw ceph-common python3-rados python3-rbd
  qemu-system-x86 qemu-block-extra qemu-utils linux-image-amd64 busybox-static
  python3-venv e2fsprogs cpio faketime tmux prometheus systemd openssl haproxy mmdebstrap
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
  [ "$status" = "installed" ] || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install: missing Debian packages: ${missing[*]}; run this as root or apt-get install them" >&2
    exit 1
  fi
  echo "install: apt-get install ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  echo "install: creating .venv from /usr/bin/python3"
  /usr/bin/python3 -m venv --system-site-packages .venv
fi

# Reinstall only when the declared dependencies change.
stamp=".venv/.rbd-restore-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ] || ! .venv/bin/python -c 'import rbd_restore, rados, rbd' 2>/dev/null; then
  echo "install: pip install -e .[test,openstack,bench]"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test,openstack,bench]'
  rm -f .venv/.rbd-restore-*
  touch "$stamp"
fi
echo "install: ready (.venv/bin/rbd-restore)"
