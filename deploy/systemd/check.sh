#!/bin/bash
# Checks the systemd packaging: `make install` puts exactly the expected
# files where they belong (PREFIX=/usr and the default /usr/local), never
# overwrites an existing settings file, rewrites ExecStart to the installed
# binary, and `systemd-analyze verify` accepts the installed unit without a
# single warning. The sample settings must name every variable of README's
# Configuration table. Installs Debian's systemd package when
# systemd-analyze is missing. Fails loudly; never skips.
set -euo pipefail
cd "$(dirname "$0")/../.."
MAKE=${MAKE:-make}

fail() { echo "deploy/systemd/check.sh: FAIL: $*" >&2; exit 1; }

if ! command -v systemd-analyze >/dev/null; then
	[ "$(id -u)" = 0 ] || fail "systemd-analyze is missing and installing Debian's systemd needs root"
	command -v apt-get >/dev/null || fail "systemd-analyze is missing and there is no apt-get to install it"
	echo "installing Debian package: systemd"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd >/dev/null
	command -v systemd-analyze >/dev/null || fail "systemd installed but systemd-analyze is still missing"
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The host's own units (sysinit.target, network-online.target, ...), which
# verify needs to resolve the unit's dependencies inside the install root.
host_units=
for d in /usr/lib/systemd/system /lib/systemd/system; do
	if [ -e "$d/sysinit.target" ]; then host_units=$d; break; fi
done
[ -n "$host_units" ] || fail "no systemd units (sysinit.target) on this host"

# check_prefix PREFIX: install into a fresh root, then check it.
check_prefix() {
	local prefix=$1 root="$tmp/root${1//\//_}"
	mkdir -p "$root"
	"$MAKE" --no-print-directory install DESTDIR="$root" PREFIX="$prefix" >"$tmp/install.log" 2>&1 ||
		{ cat "$tmp/install.log" >&2; fail "make install PREFIX=$prefix failed"; }

	# Exactly these files and directories, with these modes.
	local want got
	want=$(sort <<EOF
drwxr-xr-x /etc
drwxr-xr-x /etc/mvps-provisioner
drwxr-xr-x /etc/mvps-provisioner/images
-rw------- /etc/mvps-provisioner/mvps-provisioner.env
-rwxr-xr-x $prefix/bin/mvps-provisioner
-rwxr-xr-x $prefix/bin/mvps-sidecar
-rwxr-xr-x $prefix/bin/mvps-te-dev
-rw-r--r-- $prefix/lib/modprobe.d/mvps-provisioner.conf
-rw-r--r-- $prefix/lib/modules-load.d/mvps-provisioner.conf
-rw-r--r-- $prefix/lib/systemd/system/mvps-provisioner.service
EOF
	)
	got=$(cd "$root" && find . \( -type f -o -path ./etc -o -path './etc/*' \) -printf '%M /%P\n' | sort)
	if [ "$got" != "$want" ]; then
		diff <(echo "$want") <(echo "$got") >&2 || true
		fail "make install PREFIX=$prefix: installed files differ from the list (- expected, + installed)"
	fi
	# Nothing but directories besides those files.
	[ -z "$(cd "$root" && find . ! -type d ! -type f)" ] || fail "make install PREFIX=$prefix: installed something that is neither file nor directory"

	local unit="$root$prefix/lib/systemd/system/mvps-provisioner.service"
	grep -qx "ExecStart=$prefix/bin/mvps-provisioner" "$unit" ||
		fail "installed unit's ExecStart is not $prefix/bin/mvps-provisioner: $(grep '^ExecStart=' "$unit")"
	# The installed unit is the source with only the binary path changed.
	diff <(sed "s|$prefix/bin/|/usr/local/bin/|g" "$unit") deploy/systemd/mvps-provisioner.service >/dev/null ||
		fail "installed unit differs from deploy/systemd/mvps-provisioner.service beyond the binary path"
	grep -q "^#PROVISIONER_ENGINE_BIN=$prefix/bin/mvps-te-dev\$" "$root/etc/mvps-provisioner/mvps-provisioner.env" ||
		fail "installed settings do not point at $prefix/bin/mvps-te-dev"

	# A second install keeps an edited settings file.
	echo "# edited by the admin" >>"$root/etc/mvps-provisioner/mvps-provisioner.env"
	"$MAKE" --no-print-directory install DESTDIR="$root" PREFIX="$prefix" >"$tmp/install.log" 2>&1 ||
		{ cat "$tmp/install.log" >&2; fail "second make install PREFIX=$prefix failed"; }
	grep -qx "# edited by the admin" "$root/etc/mvps-provisioner/mvps-provisioner.env" ||
		fail "make install overwrote an existing /etc/mvps-provisioner/mvps-provisioner.env"

	# verify, inside the install root so that ExecStart= resolves to the
	# installed binary; the host's units are copied in (never over ours).
	mkdir -p "$root/usr/lib/systemd/system"
	cp -an "$host_units/." "$root/usr/lib/systemd/system/"
	local out
	if ! out=$(systemd-analyze verify --root="$root" "$prefix/lib/systemd/system/mvps-provisioner.service" 2>&1); then
		echo "$out" >&2
		fail "systemd-analyze verify rejected the unit installed with PREFIX=$prefix"
	fi
	# verify only warns about unknown keys and unparsable values: any output
	# at all is a failure.
	[ -z "$out" ] || { echo "$out" >&2; fail "systemd-analyze verify warned about the unit installed with PREFIX=$prefix"; }
	echo "ok: make install PREFIX=$prefix, systemd-analyze verify clean"
}

check_prefix /usr
check_prefix /usr/local

# Every variable of README's Configuration table is in the sample settings.
vars=$(sed -n '/^## Configuration/,/^## /p' README.md | grep '^| `[A-Z]' | cut -d'|' -f2 | grep -o '`[A-Z][A-Z0-9_]*`' | tr -d '`' | sort -u)
[ -n "$vars" ] || fail "found no variables in README's Configuration table"
for v in $vars; do
	grep -Eq "^#?$v=" deploy/systemd/mvps-provisioner.env || fail "deploy/systemd/mvps-provisioner.env lacks $v (README, Configuration)"
done
echo "ok: the sample settings name all $(wc -w <<<"$vars") variables of README's Configuration table"
