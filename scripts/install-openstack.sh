#!/usr/bin/env bash
# Install what the OpenStack tests need on Debian 12, idempotently (after install.sh):
#   - Debian packages: RabbitMQ and MariaDB's server and client (the test bed's message
#     bus and database) and Cinder 21 (Zed, the oldest release installable here) with
#     pytest and boto3 for /usr/bin/python3;
#   - .venv-cinder: the current Cinder from PyPI with python-openstackclient, in a
#     virtualenv that sees no Debian package but the rados and rbd bindings (linked in:
#     Debian's oslo and tooz releases do not mix with PyPI's), rbd-restore and the
#     drivers in contrib/openstack in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(rabbitmq-server mariadb-server-core mariadb-client-core python3-cinder python3-pytest
              python3-pytest-timeout python3-boto3)
CINDER_PIP=("cinder>=29,<30" "python-openstackclient>=7,<11" "PyMySQL>=1.0,<2" "boto3>=1.34,<2"
            "pytest>=8,<10" "pytest-timeout>=2.3,<3" "fixtures>=4,<5" "oslotest>=5,<7" "ddt>=1.6,<2"
            "testtools>=2.7,<3")

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
  [ "$status" = "installed" ] || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-openstack: missing Debian packages: ${missing[*]}; run as root" >&2
    exit 1
  fi
  echo "install-openstack: apt-get install ${missing[*]}"
  apt-get update -q
  # Cinder's packages would start services through systemd: none here, and none wanted.
  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -q --no-install-recommends \
    "${missing[@]}"
fi

venv=.venv-cinder
site="$venv/lib/python3.11/site-packages"
stamp="$venv/.rbd-restore-$(cat scripts/install-openstack.sh pyproject.toml \
  contrib/openstack/pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "install-openstack: building $venv (Cinder from PyPI)"
  rm -rf "$venv"
  /usr/bin/python3 -m venv "$venv"
  for binding in rados rbd; do
    ln -sf "$(/usr/bin/python3 -c "import $binding; print($binding.__file__)")" "$site/"
  done
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "${CINDER_PIP[@]}" -e . -e contrib/openstack
  touch "$stamp"
fi
echo "install-openstack: ready ($venv, Debian Cinder $(dpkg-query -W -f='${Version}' \
  python3-cinder))"
