#!/bin/bash
# make image-test: the image is reproducible and its programs run in a real
# container runtime (docs/image.md).
#
#  1. make image twice, into two output directories: the two oci-archives
#     must be the same bytes, with the same manifest digest. With
#     IMAGE_TEST_FRESH_GOCACHE=1 the second build has an empty Go build cache,
#     so its binaries are compiled anew (several minutes on 2 busy cores, so
#     not by default; docs/image.md has the figures).
#  2. skopeo reads the archive: the labels carry the version and revision
#     that the binaries print, and the created time is SOURCE_DATE_EPOCH.
#  3. podman loads it and runs, from the image, each binary's --version and
#     check-config (valid and invalid settings), and mke2fs, blkid and
#     modprobe; mke2fs formats a file with the daemon's flags and blkid
#     finds the ext4 on it.
#
# Podman runs with runc and cgroupfs and without default ulimits, which is
# what works on the project's machines (no nbd module there: nothing is
# attached).
set -euo pipefail
cd "$(dirname "$0")/../.."
make=${MAKE:-make}
binaries=${IMAGE_BINARIES:?IMAGE_BINARIES names the binaries in the image}
work=$PWD/.cache/image-test
ref=localhost/mvps-provisioner:image-test
rm -rf "$work"
mkdir -p "$work"

fail() { echo "image-test: FAIL: $*" >&2; failed=$((failed + 1)); }
failed=0
passed=0
pass() { echo "image-test: ok: $*"; passed=$((passed + 1)); }

for tool in podman runc skopeo; do
	command -v "$tool" >/dev/null || { echo "image-test: $tool is missing: run 'make deps'" >&2; exit 1; }
done

# 1. Twice, the same.
start=$(date +%s)
$make --no-print-directory image OUT="$work/a" IMAGE_REF="$ref" >"$work/a.log" 2>&1 || { cat "$work/a.log"; exit 1; }
echo "image-test: first build $(($(date +%s) - start)) s"
start=$(date +%s)
cache=$(go env GOCACHE)
if [ -n "${IMAGE_TEST_FRESH_GOCACHE:-}" ]; then
	cache=$work/gocache
fi
GOCACHE=$cache $make --no-print-directory image OUT="$work/b" IMAGE_REF="$ref" >"$work/b.log" 2>&1 || { cat "$work/b.log"; exit 1; }
echo "image-test: second build $(($(date +%s) - start)) s (GOCACHE=$cache)"
rm -rf "$work/gocache"
a=$work/a/mvps-provisioner-image.tar
b=$work/b/mvps-provisioner-image.tar
digest_a=$(skopeo inspect --format '{{.Digest}}' "oci-archive:$a")
digest_b=$(skopeo inspect --format '{{.Digest}}' "oci-archive:$b")
echo "image-test: digests $digest_a $digest_b"
if [ "$("$work/a/mvps-provisioner" --version)" != "$("$work/b/mvps-provisioner" --version)" ]; then
	fail "the version changed between the builds (the tree was edited?): $("$work/a/mvps-provisioner" --version) vs $("$work/b/mvps-provisioner" --version)"
elif [ "$digest_a" = "$digest_b" ] && cmp -s "$a" "$b"; then
	pass "two builds, one image: $digest_a, archive sha256 $(sha256sum <"$a" | cut -c1-64)"
else
	fail "two builds differ: $digest_a vs $digest_b"
	for x in a b; do tar -tvf "$work/$x/mvps-provisioner-image.tar" >"$work/$x.list"; done
	diff "$work/a.list" "$work/b.list" >&2 || true
fi
grep -q "$digest_a" "$work/a.log" && pass "make image printed the digest" || fail "make image did not print $digest_a"

# 2. What the archive says about itself, against what the binaries say.
host_version=$("$work/a/mvps-provisioner" --version)
version=$(awk '{print $2}' <<<"$host_version")
revision=$(sed -n 's/.*(revision \([^,]*\),.*/\1/p' <<<"$host_version")
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)}
created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
inspect=$(skopeo inspect "oci-archive:$a")
label() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["Labels"].get(sys.argv[1], ""))' "$1" <<<"$inspect"; }
field() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(d[sys.argv[1]])' "$1" <<<"$inspect"; }
[ "$(label org.opencontainers.image.version)" = "$version" ] && pass "label version $version" ||
	fail "label version $(label org.opencontainers.image.version), the binary says $version"
[ "$(label org.opencontainers.image.revision)" = "$revision" ] && pass "label revision $revision" ||
	fail "label revision $(label org.opencontainers.image.revision), the binary says $revision"
[ -n "$(label org.opencontainers.image.source)" ] && pass "label source $(label org.opencontainers.image.source)" || fail "no label source"
[ "$(field Created)" = "$created" ] && pass "created $created (SOURCE_DATE_EPOCH $epoch)" ||
	fail "created $(field Created), want $created"
[ "$(field Architecture)/$(field Os)" = "$(go env GOARCH)/linux" ] && pass "platform linux/$(go env GOARCH)" || fail "platform $(field Os)/$(field Architecture)"

# 3. In a container.
conf=$work/containers.conf
printf '[containers]\ndefault_ulimits = []\n' >"$conf"
export CONTAINERS_CONF=$conf
podman=(podman --runtime runc --cgroup-manager cgroupfs)
trap '"${podman[@]}" rmi -f "$ref" >/dev/null 2>&1 || true' EXIT
"${podman[@]}" load -i "$a" >"$work/load.log" 2>&1 || { cat "$work/load.log"; exit 1; }
loaded=$("${podman[@]}" image inspect --format '{{.Digest}}' "$ref")
[ "$loaded" = "$digest_a" ] && pass "podman load: $ref $loaded" || fail "podman load: $ref is $loaded, want $digest_a"

# in_image CODE PATTERN ARGS...: run ARGS in the image; the exit code must be
# CODE and the output (stdout and stderr) must match the extended regular
# expression PATTERN.
in_image() {
	local want=$1 pattern=$2 out code=0
	shift 2
	out=$("${podman[@]}" run --rm --pull never --network none "${run_opts[@]}" "$ref" "$@" 2>&1) || code=$?
	if [ "$code" = "$want" ] && grep -Eq -- "$pattern" <<<"$out"; then
		pass "$* -> $code: $(head -n1 <<<"$out")"
	else
		fail "$* -> exit $code (want $want), output not matching /$pattern/:"$'\n'"$out"
	fi
	run_opts=()
}
run_opts=()

for b in $binaries; do
	in_image 0 "^$b $version \\(revision $revision, go" "$b" --version
	case $b in
	mvps-provisioner)
		mkdir -p "$work/configs-bad"
		cp examples/images/* "$work/configs-bad/"
		echo '{"image_id": "x", "image_size": "big"}' >"$work/configs-bad/broken"
		run_opts=(-v "$PWD/examples/images:/images:ro")
		in_image 0 "^ok +[^ ]+:" mvps-provisioner check-config /images
		run_opts=(-v "$work/configs-bad:/images:ro")
		in_image 1 "INVALID +broken" mvps-provisioner check-config /images
		;;
	mvps-sidecar)
		run_opts=(-e IMAGE_KEY=demo -e MOUNTPOINT=/data/disk -e PROVISIONER_LISTEN_PATH=/run/mvps/provisioner.sock)
		in_image 0 "^ok +image key demo, mountpoint /data/disk" mvps-sidecar check-config
		run_opts=(-e IMAGE_KEY=a/b -e MOUNTPOINT=/data/disk -e PROVISIONER_LISTEN_PATH=/run/mvps/provisioner.sock)
		in_image 2 "IMAGE_KEY \\(--image-key\\)" mvps-sidecar check-config
		;;
	mvps-csi)
		run_opts=(-e CSI_ENDPOINT=unix:///csi/csi.sock -e PROVISIONER_IMAGES_CM=mvps-system/mvps-images)
		in_image 0 "^configuration OK" mvps-csi check-config
		run_opts=(-e CSI_ENDPOINT=tcp://0.0.0.0:9000 -e PROVISIONER_IMAGES_CM=mvps-system/mvps-images)
		in_image 78 "CSI_ENDPOINT \\(--endpoint\\)" mvps-csi check-config
		;;
	mvps-te-dev)
		# The dev engine has no check-config: its settings are mvps-te's
		# environment. A start without a JWT secret must fail on that.
		in_image 2 "MVPS_TE_JWT_SECRET" mvps-te-dev
		;;
	*)
		# A new binary: its check-config with no settings must pass.
		# Give it a case of its own when it needs some.
		in_image 0 "" "$b" check-config
		;;
	esac
done

in_image 0 "^mke2fs 1\\.47" mke2fs -V
in_image 0 "^blkid from util-linux 2\\.38" blkid -V
in_image 0 "^kmod version [0-9]+" modprobe --version
# mount mode's two steps, with the daemon's arguments (provision/mount).
mkdir -p "$work/disk"
truncate -s 64M "$work/disk/img"
run_opts=(-v "$work/disk:/disk")
in_image 0 "" mke2fs -F -q -t ext4 -b 4096 -E lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=1000:1000 /disk/img
run_opts=(-v "$work/disk:/disk:ro")
in_image 0 "^TYPE=ext4$" blkid -p -o export /disk/img

echo "image-test: $passed passed, $failed failed"
[ "$failed" = 0 ]
