#!/bin/bash
# PID 1 of a private PID + mount namespace (see tests/support/systemd.py, which starts it with
# `unshare --pid --mount --fork --mount-proc --propagation private`). Gives /etc, /opt and /var
# throwaway overlays in WORK and /tmp and /run fresh tmpfs, so that booting systemd and
# installing the node as a service change nothing on the host, then becomes systemd.
# Usage: systemd_boot.sh WORK
set -euo pipefail
work=$1
for d in etc opt var; do
  mkdir -p "$work/$d/upper" "$work/$d/work"
  mount -t overlay "overlay-$d" -o "lowerdir=/$d,upperdir=$work/$d/upper,workdir=$work/$d/work" "/$d"
done
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
# Boot only the basic system (no unit the host enabled, such as Orthanc or PostgreSQL, starts),
# and no tmpfiles clean-up (belt and braces: /tmp and /var are private here anyway).
for u in systemd-tmpfiles-setup.service systemd-tmpfiles-clean.timer systemd-tmpfiles-clean.service; do
  ln -sf /dev/null "/etc/systemd/system/$u"
done
exec /lib/systemd/systemd --system --unit=basic.target
