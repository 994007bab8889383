#!/usr/bin/env bash
# Builds a root filesystem tarball that stands in for the python:3.11-slim base image
# on machines that cannot pull from any registry: Debian 12 (bookworm) minbase with
# Debian's python3 (3.11), pip and venv, laid out like the official image
# (/usr/local/bin/python, python3, pip; no EXTERNALLY-MANAGED marker).
#
# usage: make_standin_base.sh OUT.tar
# Needs root and debootstrap; reaches only Debian's package mirror.
set -euo pipefail
out=${1:?usage: make_standin_base.sh OUT.tar}
mirror=${PSCNN_DEBIAN_MIRROR:-http://deb.debian.org/debian}

root=$(mktemp -d /var/tmp/pscnn-standin.XXXXXX)
cleanup() { rm -rf --one-file-system "$root"; }
trap cleanup EXIT

debootstrap --variant=minbase \
    --include=python3,python3-pip,python3-venv,ca-certificates \
    bookworm "$root" "$mirror" >"$root.log" 2>&1 || { tail -30 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"

# Look like python:3.11-slim: interpreter and pip on /usr/local/bin, pip allowed to
# install into the system environment.
for n in python python3 python3.11; do ln -sf /usr/bin/python3.11 "$root/usr/local/bin/$n"; done
printf '#!/bin/sh\nexec /usr/bin/python3.11 -m pip "$@"\n' >"$root/usr/local/bin/pip"
chmod 755 "$root/usr/local/bin/pip"
ln -sf pip "$root/usr/local/bin/pip3"
rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED

# This network reaches the package registries through a TLS-intercepting proxy whose CA
# the host trusts: give the stand-in the same extra CAs (the real python:3.11-slim on an
# open network needs none). The cache key of run_compose_test.sh covers these files.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null 2>&1
fi

# Slim it down as the official image does.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
       "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
       "$root"/usr/share/locale/* "$root"/var/log/*.log
find "$root/usr/lib/python3" "$root/usr/lib/python3.11" -name __pycache__ -prune -exec rm -rf {} + 2>/dev/null || true

tmp="$out.part.$$"
tar --numeric-owner --xattrs -C "$root" -cf "$tmp" .
mv -f "$tmp" "$out"
