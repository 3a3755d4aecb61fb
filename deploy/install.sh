#!/usr/bin/env bash
# One-step install of SpeedMimi (what `make install` runs): the binary (the eBPF object is embedded
# in it), a config (only if none is there: an operator's config is never overwritten), the systemd
# unit, the logrotate snippet and the README; optionally the kernel tuning. Idempotent: a file
# whose content is already in place is left alone and reported unchanged.
#
#   deploy/install.sh --binary target/prod/speedmimi [--prefix /usr/local] [--destdir DIR]
#                     [--tune] [--enable] [--dry-run]
#
# --dry-run prints what it would do and changes nothing. --destdir installs under DIR (packaging,
# tests). --tune runs `speedmimi tune --apply`; --enable runs `systemctl enable --now speedmimi`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
binary="" prefix="/usr/local" destdir="" tune=0 enable=0 dry=0

usage() { sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) binary="$2"; shift 2 ;;
        --prefix) prefix="$2"; shift 2 ;;
        --destdir) destdir="$2"; shift 2 ;;
        --tune) tune=1; shift ;;
        --enable) enable=1; shift ;;
        --dry-run) dry=1; shift ;;
        -h|--help) usage 0 ;;
        *) echo "install.sh: unknown argument $1" >&2; usage 2 ;;
    esac
done
[ -n "$binary" ] || { echo "install.sh: --binary PATH is required (make install builds it)" >&2; exit 2; }
[ -x "$binary" ] || { echo "install.sh: $binary is not an executable; build it first (make build-prod)" >&2; exit 2; }
if [ "$dry" = 0 ] && [ -z "$destdir" ] && [ "$(id -u)" != 0 ]; then
    echo "install.sh: installing into the system needs root: sudo $0 $*  (or --dry-run to see what it does)" >&2
    exit 2
fi

say() { printf '%-10s %s\n' "$1" "$2"; }

# put MODE SOURCE TARGET: installs SOURCE as TARGET unless TARGET has that content already.
put() {
    local mode="$1" src="$2" dst="$destdir$3"
    if [ -f "$dst" ] && cmp -s "$src" "$dst"; then
        say unchanged "$3"
    elif [ "$dry" = 1 ]; then
        say "would put" "$3 (mode $mode)"
    else
        install -D -m "$mode" "$src" "$dst"
        say installed "$3"
    fi
}

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

put 0755 "$binary" "$prefix/bin/speedmimi"

# The config: the example the repository documents, with the access log where the logrotate snippet
# looks (the unit's LogsDirectory= makes /var/log/speedmimi, writable by the service's user).
sed 's#^\(  real_ip_header:.*\)$#  access_log: "/var/log/speedmimi/access.log"\n\1#' "$repo/configs/config.yaml" \
    > "$tmp/config.yaml"
grep -q '^  access_log: "/var/log/speedmimi/access.log"$' "$tmp/config.yaml" \
    || { echo "install.sh: could not set server.access_log in the default config" >&2; exit 1; }
put 0644 "$tmp/config.yaml" "/etc/speedmimi/config.yaml.default"
if [ -e "$destdir/etc/speedmimi/config.yaml" ]; then
    say kept "/etc/speedmimi/config.yaml (yours; the shipped one is config.yaml.default)"
else
    put 0644 "$tmp/config.yaml" "/etc/speedmimi/config.yaml"
fi

sed "s#/usr/local/bin/speedmimi#$prefix/bin/speedmimi#g; s#/usr/local/share/doc#$prefix/share/doc#g" \
    "$here/speedmimi.service" > "$tmp/speedmimi.service"
put 0644 "$tmp/speedmimi.service" "/etc/systemd/system/speedmimi.service"
put 0644 "$here/speedmimi.logrotate" "/etc/logrotate.d/speedmimi"
put 0644 "$repo/README.md" "$prefix/share/doc/speedmimi/README.md"

# systemd picks up a changed unit only after a reload (not under --destdir: that is not this system).
if [ -z "$destdir" ] && [ -d /run/systemd/system ]; then
    if [ "$dry" = 1 ]; then say "would run" "systemctl daemon-reload"; else systemctl daemon-reload && say ran "systemctl daemon-reload"; fi
    if [ "$enable" = 1 ]; then
        if [ "$dry" = 1 ]; then say "would run" "systemctl enable --now speedmimi"; else systemctl enable --now speedmimi && say ran "systemctl enable --now speedmimi"; fi
    fi
elif [ "$enable" = 1 ]; then
    say skipped "systemctl enable --now speedmimi (no running systemd here)"
fi

if [ "$tune" = 1 ]; then
    if [ "$dry" = 1 ] || [ -n "$destdir" ]; then
        "$binary" tune   # prints only: a dry run, or a tree that is not this system
    else
        "$binary" tune --apply
    fi
fi

if [ "$dry" = 0 ]; then
    echo "next: edit /etc/speedmimi/config.yaml (check it: speedmimi --check -c /etc/speedmimi/config.yaml),"
    echo "      then systemctl enable --now speedmimi; reload with systemctl reload speedmimi"
fi
