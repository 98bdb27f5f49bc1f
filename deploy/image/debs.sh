#!/bin/bash
# The Debian packages of the image (docs/image.md), pinned in debs.lock:
#
#   debs.sh fetch [DIR]       download each locked .deb into DIR (.cache/debs)
#                             with apt-get download, unless there already, and
#                             check its SHA-256 against the lock
#   debs.sh lock [NAME...]    rewrite debs.lock with the current candidate
#                             version (and the SHA-256 the archive's index
#                             gives) of each package already locked, plus
#                             NAME...; then run fetch
#
# apt-get reads this machine's sources (Debian bookworm on the project's
# machines). A locked version that the archive no longer serves (a point
# release or a security update replaced it) cannot be fetched: refresh the
# lock, which changes the image.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
lock=$here/debs.lock

# apt-cache and apt-get download need the package lists; a machine that has
# none yet (or an outdated one) gets them once.
apt_update_once() {
	if [ -z "${updated:-}" ]; then
		updated=1
		echo "apt-get update" >&2
		apt-get update -qq >&2
	fi
}

locked() { grep -v '^[[:space:]]*\(#\|$\)' "$lock"; }

fetch() {
	local dir=${1:-.cache/debs}
	mkdir -p "$dir"
	dir=$(cd "$dir" && pwd)
	local name version arch sum file
	while read -r name version arch sum; do
		file=$dir/${name}_${version//:/%3a}_${arch}.deb
		if [ ! -e "$file" ]; then
			echo "fetch $name=$version ($arch)" >&2
			# apt-get download writes into the current directory, as the
			# unprivileged _apt user when it can: a private directory of
			# its own, then moved.
			local tmp spec=$name:$arch=$version
			[ "$arch" != all ] || spec=$name=$version
			tmp=$(mktemp -d)
			chown _apt "$tmp" 2>/dev/null || true
			if ! (cd "$tmp" && apt-get download -qq "$spec" >&2); then
				apt_update_once
				(cd "$tmp" && apt-get download -qq "$spec" >&2) || {
					rm -rf "$tmp"
					echo "debs.sh: $name=$version is not in the archive any more: run 'make image-lock' (deploy/image/debs.sh lock) to move to the current version" >&2
					exit 1
				}
			fi
			mv "$tmp"/*.deb "$file.part"
			rm -rf "$tmp"
		else
			cp "$file" "$file.part" # checked below like a download
		fi
		if ! echo "$sum  $file.part" | sha256sum --check --status; then
			rm -f "$file.part" "$file"
			echo "debs.sh: $file: SHA-256 is not the locked $sum" >&2
			exit 1
		fi
		mv "$file.part" "$file"
	done < <(locked)
}

relock() {
	local names
	names=$( (locked | awk '{print $1}'; printf '%s\n' "$@") | sort -u)
	apt_update_once
	local arch
	arch=$(dpkg --print-architecture)
	local out
	out=$(mktemp)
	{
		echo "# Debian packages of the image: NAME VERSION ARCH SHA256 of the .deb."
		echo "# Written by deploy/image/debs.sh lock (make image-lock); see docs/image.md."
		local name rec version parch sum
		for name in $names; do
			rec=$(apt-cache show --no-all-versions "$name:$arch")
			version=$(awk '/^Version:/{print $2; exit}' <<<"$rec")
			parch=$(awk '/^Architecture:/{print $2; exit}' <<<"$rec")
			sum=$(awk '/^SHA256:/{print $2; exit}' <<<"$rec")
			if [ -z "$version" ] || [ -z "$sum" ]; then
				echo "debs.sh: no candidate for $name" >&2
				exit 1
			fi
			echo "$name $version $parch $sum"
		done
	} >"$out"
	mv "$out" "$lock"
	chmod 0644 "$lock"
	echo "wrote $lock" >&2
}

case "${1:-}" in
fetch) shift; fetch "$@" ;;
lock) shift; relock "$@"; fetch ;;
*) sed -n '2,10p' "$0" >&2; exit 2 ;;
esac
