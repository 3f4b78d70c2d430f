#!/bin/sh
# Installs labgate from this release directory (run as root):
#   /usr/bin/labgate, /usr/share/labgate/devices/{profiles,methods},
#   /etc/labgate/labgate.toml (only if absent), the systemd unit, sysusers and tmpfiles.
# Then: edit /etc/labgate/labgate.toml; systemctl enable --now labgate.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
install -D -m 0755 "$here/labgate" /usr/bin/labgate
mkdir -p /usr/share/labgate/devices
cp -r "$here/devices/profiles" "$here/devices/methods" /usr/share/labgate/devices/
install -D -m 0644 "$here/systemd/labgate.service" /usr/lib/systemd/system/labgate.service
install -D -m 0644 "$here/systemd/labgate.sysusers" /usr/lib/sysusers.d/labgate.conf
install -D -m 0644 "$here/systemd/labgate.tmpfiles" /usr/lib/tmpfiles.d/labgate.conf
if [ ! -e /etc/labgate/labgate.toml ]; then
  install -D -m 0640 "$here/labgate.example.toml" /etc/labgate/labgate.toml
fi
if command -v systemd-sysusers >/dev/null 2>&1; then systemd-sysusers labgate.conf || systemd-sysusers; fi
if command -v systemd-tmpfiles >/dev/null 2>&1; then systemd-tmpfiles --create labgate.conf || true; fi
chgrp labgate /etc/labgate/labgate.toml 2>/dev/null || true
if command -v systemctl >/dev/null 2>&1; then systemctl daemon-reload || true; fi
/usr/bin/labgate --version
echo "installed; edit /etc/labgate/labgate.toml, then: systemctl enable --now labgate"
