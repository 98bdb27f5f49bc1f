#!/usr/bin/env bash
# vmtest/run.sh: run the VM integration tests (Go tests whose first line is "//go:build vmtest")
# inside a qemu VM (TCG) that boots Debian's stock kernel, which has NBD and ext4 as modules.
#
#   bash vmtest/run.sh [-run REGEX]        (from the repository root; "make integration")
#
# Steps: install missing Debian packages, fetch/cache the kernel in .cache/vm/kernel-<ver>/,
# build ./cmd/* (+ ./examples/client) and the vmtest test binaries statically, pack them with
# busybox, e2fsprogs and the modules into an initramfs, boot it, stream the serial console and
# exit 0 only if the guest's /init (vmtest/init.sh) printed "RESULT: PASS".
# Knobs (environment): see usage below.
set -euo pipefail
shopt -s extglob
export LC_ALL=C
export PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin:/usr/local/go/bin

usage() {
	cat <<'EOF'
usage: bash vmtest/run.sh [-run REGEX]

  -run REGEX   run only the tests matching REGEX (go test -run syntax; same as VM_TEST_RUN)

environment:
  VM_TIMEOUT=900        seconds for the whole VM run (qemu is killed after that)
  VM_TEST_TIMEOUT=300s  -test.timeout of each test binary in the guest
  VM_TEST_RUN=REGEX     like -run
  VM_SMP=1              guest CPUs (1 measured faster than 2 under TCG on a 2-core host)
  VM_MEM=2048           guest memory in MB
  VM_ACCEL=tcg          qemu accelerator; KVM hangs on the usual CI/dev machines
  VM_CPU=max            qemu CPU model (max: RDRAND, so the guest's random pool is ready at once)
  VM_PVH=1              0: boot the compressed bzImage instead of the unpacked vmlinux (PVH)
  VM_GZIP=0             1: gzip the initramfs (measured slower to boot under TCG)
  VM_EXTRA_BINS=        extra host executables to copy into the guest at the same path, with
                        their libraries (e.g. "/usr/sbin/nbd-client /usr/bin/nbd-server")
  VM_MODULES=           extra kernel modules to load in the guest (names, e.g. "loop dm_mod")
  VM_APPEND=            extra kernel command line arguments
  VM_KERNEL_PKG=        pin the kernel package (e.g. linux-image-6.1.0-56-amd64);
                        default: what linux-image-amd64 depends on now
  VM_CACHE=.cache/vm    kernel cache and output dir (output in $VM_CACHE/out, log: out/vm.log)
  GO=go                 go command
EOF
}

die() {
	echo "vmtest: ERROR: $*" >&2
	exit 1
}
log() { echo "vmtest: $*"; }

# now_us prints the wall clock in microseconds.
now_us() { echo "${EPOCHREALTIME/./}"; }
secs() { # FROM_US TO_US: seconds between them, one decimal
	local d=$(($2 - $1))
	printf '%d.%d' $((d / 1000000)) $((d / 100000 % 10))
}

t_start=$(now_us)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

run_re=${VM_TEST_RUN:-}
while (($# > 0)); do
	case $1 in
	-run | --run)
		(($# >= 2)) || die "$1 needs an argument"
		run_re=$2
		shift 2
		;;
	-run=* | --run=*)
		run_re=${1#*=}
		shift
		;;
	-h | -help | --help)
		usage
		exit 0
		;;
	*)
		usage >&2
		exit 2
		;;
	esac
done

VM_TIMEOUT=${VM_TIMEOUT:-900}
VM_TEST_TIMEOUT=${VM_TEST_TIMEOUT:-300s}
VM_SMP=${VM_SMP:-1}
VM_MEM=${VM_MEM:-2048}
VM_ACCEL=${VM_ACCEL:-tcg}
VM_CPU=${VM_CPU:-max}
VM_PVH=${VM_PVH:-1}
VM_GZIP=${VM_GZIP:-0}
VM_EXTRA_BINS=${VM_EXTRA_BINS:-}
VM_MODULES=${VM_MODULES:-}
VM_APPEND=${VM_APPEND:-}
VM_KERNEL_PKG=${VM_KERNEL_PKG:-}
VM_CACHE=${VM_CACHE:-$ROOT/.cache/vm}
GO=${GO:-go}
OUT=$VM_CACHE/out

[[ $VM_TIMEOUT =~ ^[0-9]+$ ]] || die "VM_TIMEOUT must be a number of seconds, not '$VM_TIMEOUT'"
[[ $VM_SMP =~ ^[1-9][0-9]*$ ]] || die "VM_SMP must be a positive number, not '$VM_SMP'"
[[ $VM_TEST_TIMEOUT =~ ^[0-9a-z.]+$ ]] || die "VM_TEST_TIMEOUT must be a Go duration, not '$VM_TEST_TIMEOUT'"

# Things to clean up on exit: temp dirs and the qemu process.
cleanup_dirs=()
qemu_pid=''
declare -A build_jobs=() # pid -> "name: command"
# shellcheck disable=SC2317 # invoked by the trap
cleanup() {
	local pid
	for pid in "${!build_jobs[@]}" $qemu_pid; do
		kill "$pid" 2>/dev/null || true
	done
	if ((${#cleanup_dirs[@]} > 0)); then
		rm -rf "${cleanup_dirs[@]}"
	fi
}
trap cleanup EXIT
trap 'echo "vmtest: interrupted" >&2; exit 130' INT TERM

mkdir -p "$VM_CACHE"
# One run at a time per cache (the kernel cache and the out dir are shared).
if command -v flock >/dev/null; then
	exec {lock_fd}>"$VM_CACHE/lock"
	if ! flock -n "$lock_fd"; then
		log "waiting for another run using $VM_CACHE"
		flock "$lock_fd"
		log "waited $(secs "$t_start" "$(now_us)")s for the other run"
	fi
fi
t_locked=$(now_us)

# ---------------------------------------------------------------- 1. Debian packages
as_root() {
	if ((EUID == 0)); then
		"$@"
	elif command -v sudo >/dev/null; then
		sudo "$@"
	else
		die "need root (or sudo) to run: $*"
	fi
}

apt_updated=0
apt_update_once() { # returns 1 if apt-get update fails (output in $VM_CACHE/apt-update.log)
	((apt_updated)) && return 0
	apt_updated=1
	as_root apt-get -o DPkg::Lock::Timeout=300 update -q >"$VM_CACHE/apt-update.log" 2>&1
}

apt_install() {
	apt_update_once || {
		cat "$VM_CACHE/apt-update.log" >&2
		die "apt-get update failed"
	}
	as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "$@" \
		>"$VM_CACHE/apt-install.log" 2>&1 || {
		cat "$VM_CACHE/apt-install.log" >&2
		die "apt-get install $* failed"
	}
}

pkg_installed() { [[ $(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null) == ii* ]]; }

missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
pkg_installed busybox-static || missing+=(busybox-static) # a dynamic busybox is no use in the initramfs
command -v mke2fs >/dev/null || missing+=(e2fsprogs)
command -v cpio >/dev/null || missing+=(cpio)
{ command -v depmod && command -v modprobe; } >/dev/null || missing+=(kmod)
if ((${#missing[@]} > 0)); then
	apt_install "${missing[@]}"
	log "packages: installed ${missing[*]}"
else
	log "packages: all present"
fi
command -v "$GO" >/dev/null || die "no go command ('$GO'); install Go or set GO=/path/to/go"
BUSYBOX=/bin/busybox
[[ -x $BUSYBOX ]] || BUSYBOX=$(command -v busybox) || die "busybox not found"

# ---------------------------------------------------------------- 2. build
t_build=$(now_us)
rm -rf "$OUT"
mkdir -p "$OUT/bin" "$OUT/tests" "$OUT/build"
# Resolving the kernel package takes apt-cache over a second: let it run during the build.
resolve_kernel_pkg() { # prints linux-image-<version>-amd64, or nothing
	{ apt-cache depends linux-image-amd64 2>/dev/null || true; } |
		sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n1
}
if [[ -z $VM_KERNEL_PKG ]]; then
	resolve_kernel_pkg >"$OUT/kernel-pkg" &
	resolve_pid=$!
fi
export CGO_ENABLED=0 GOOS=linux GOARCH=amd64

# main_pkg DIR: DIR holds a main package (non-test .go files with "package main").
main_pkg() {
	local dir=$1 f name err
	for f in "$dir"/*.go; do
		[[ -f $f && $f != *_test.go ]] && break
		f=
	done
	[[ -n ${f:-} ]] || return 1
	if ! name=$("$GO" list -f '{{.Name}}' "./$dir" 2>"$OUT/golist.err"); then
		err=$(<"$OUT/golist.err")
		[[ $err == *"no Go files"* || $err == *"build constraints exclude"* ]] && return 1
		echo "$err" >&2
		die "build: go list ./$dir failed"
	fi
	[[ $name == main ]]
}

declare -A bins=()
for d in cmd/*/; do
	d=${d%/}
	if [[ -d $d ]] && main_pkg "$d"; then bins[$d]=${d##*/}; fi
done
if [[ -d examples/client ]] && main_pkg examples/client; then
	bins[examples/client]=example-client
fi

# The go commands run in parallel; spawn NAME CMD... starts one, join waits for all of them.
spawn() {
	local name=$1
	shift
	"$@" >"$OUT/build/$name.log" 2>&1 &
	build_jobs[$!]="$name: $*"
}
join() {
	local pid failed=0
	for pid in "${!build_jobs[@]}"; do
		if ! wait "$pid"; then
			echo "vmtest: build FAILED: ${build_jobs[$pid]}" >&2
			cat "$OUT/build/${build_jobs[$pid]%%:*}.log" >&2
			failed=1
		fi
	done
	build_jobs=()
	((failed == 0)) || die "build failed"
}

built=()
for d in "${!bins[@]}"; do
	spawn "${bins[$d]}" "$GO" build -trimpath -o "$OUT/bin/${bins[$d]}" "./$d"
	built+=("${bins[$d]}")
done

# VM test packages: directories with a *_test.go file whose first line is //go:build vmtest.
declare -A testdirs=()
while IFS= read -r -d '' f; do
	first=
	IFS= read -r first <"$f" || true
	first=${first%$'\r'}
	[[ $first =~ ^//go:build\ vmtest($|\ ) ]] && testdirs[$(dirname "${f#./}")]=1
done < <(find . \( -name .cache -o -name .git -o -name testdata -o -name vendor -o -path ./vmtest/out \) \
	-prune -o -type f -name '*_test.go' -print0)
tests=()
for d in "${!testdirs[@]}"; do
	name=${d//\//-}
	[[ $d == . ]] && name=${ROOT##*/}
	spawn "$name.test" "$GO" test -c -tags vmtest -o "$OUT/tests/$name.test" "./$d"
	if [[ -d $d/testdata ]]; then cp -a "$d/testdata" "$OUT/tests/$name.testdata"; fi
	tests+=("$name")
done
((${#tests[@]} > 0)) || die "build: no package has a *_test.go file starting with //go:build vmtest"
join
for name in "${tests[@]}"; do
	[[ -f $OUT/tests/$name.test ]] || die "build: go test -c wrote no $name.test"
done
log "built: bin: $(printf '%s\n' "${built[@]}" | sort | xargs); tests: $(printf '%s\n' "${tests[@]}" | sort | xargs)"

# ---------------------------------------------------------------- 3. kernel
t_kernel=$(now_us)
# Leftovers of interrupted downloads (we hold the lock, so nobody else is using them).
rm -rf "$VM_CACHE"/.kernel-*

# kernel_ok VERSION: the cache for VERSION is complete (it is renamed into place when done).
kernel_ok() { [[ -f $VM_CACHE/kernel-$1/boot/vmlinuz-$1 && -f $VM_CACHE/kernel-$1/lib/modules/$1/modules.dep ]]; }

# download_kernel PKG VERSION: apt-get download, unpack and depmod into a temp dir, then rename
# it to kernel-VERSION. Returns 1 if the download fails (log in $VM_CACHE/kernel-download.log).
download_kernel() {
	local pkg=$1 ver=$2 tmp debs
	tmp=$(mktemp -d "$VM_CACHE/.kernel-$ver.XXXXXX")
	cleanup_dirs+=("$tmp")
	log "kernel: downloading $pkg"
	if ! (cd "$tmp" && apt-get download "$pkg") >"$VM_CACHE/kernel-download.log" 2>&1; then
		rm -rf "$tmp"
		return 1
	fi
	debs=("$tmp"/*.deb)
	[[ -f ${debs[0]} ]] || die "kernel: apt-get download $pkg produced no .deb"
	dpkg-deb -x "${debs[0]}" "$tmp/root" || die "kernel: dpkg-deb -x ${debs[0]} failed"
	rm -f "${debs[@]}"
	[[ -f $tmp/root/boot/vmlinuz-$ver ]] || die "kernel: $pkg has no boot/vmlinuz-$ver"
	depmod -b "$tmp/root" "$ver" || die "kernel: depmod -b failed"
	rm -rf "$VM_CACHE/kernel-$ver"
	mv "$tmp/root" "$VM_CACHE/kernel-$ver"
	rm -f "$VM_CACHE/kernel-download.log"
	rm -rf "$tmp"
	log "kernel: downloaded and unpacked $ver"
}

# use_cached_kernel WHY: fall back to the newest complete kernel in the cache (offline runs).
use_cached_kernel() {
	local d v
	while IFS= read -r d; do
		v=${d##*/kernel-}
		if kernel_ok "$v"; then
			log "kernel: WARNING: $1; using the cached $v"
			kver=$v
			return 0
		fi
	done < <(printf '%s\n' "$VM_CACHE"/kernel-* | sort -rV)
	return 1
}

kpkg=$VM_KERNEL_PKG
if [[ -z $kpkg ]]; then
	wait "$resolve_pid" || true
	kpkg=$(<"$OUT/kernel-pkg")
fi
if [[ -z $kpkg ]] && apt_update_once; then # no package lists yet (fresh machine)
	kpkg=$(resolve_kernel_pkg)
fi
if [[ -z $kpkg ]]; then
	use_cached_kernel "cannot resolve linux-image-amd64 (apt-cache depends)" ||
		die "kernel: cannot resolve linux-image-amd64 with apt-cache depends (apt-get update: $VM_CACHE/apt-update.log)"
elif kver=${kpkg#linux-image-} && kernel_ok "$kver"; then
	log "kernel: cached $kver"
else
	if ! download_kernel "$kpkg" "$kver"; then
		# Stale package lists may name a version the mirror no longer has: refresh, retry once.
		if ((apt_updated == 0)) && apt_update_once && [[ -z $VM_KERNEL_PKG ]]; then
			kpkg=$(resolve_kernel_pkg)
			kver=${kpkg#linux-image-}
		fi
		if ! kernel_ok "$kver" && ! download_kernel "$kpkg" "$kver"; then
			cat "$VM_CACHE/kernel-download.log" >&2
			use_cached_kernel "'apt-get download $kpkg' failed" ||
				die "kernel: 'apt-get download $kpkg' failed (network? apt sources?); nothing was cached"
		fi
	fi
	kernel_ok "$kver" || die "kernel: cache for $kver is incomplete"
	# Drop other cached kernels: about 400 MB each.
	for d in "$VM_CACHE"/kernel-*; do
		if [[ -d $d && $d != "$VM_CACHE/kernel-$kver" ]]; then rm -rf "$d"; fi
	done
fi
KDIR=$VM_CACHE/kernel-$kver
VMLINUZ=$KDIR/boot/vmlinuz-$kver

# The bzImage spends about 5 s of TCG time decompressing itself. If the kernel has CONFIG_PVH,
# qemu boots the uncompressed ELF vmlinux directly (PVH entry): unpack it once into the cache.
is_elf() { [[ $(head -c 4 "$1" 2>/dev/null | od -An -tx1 | tr -d ' \n') == 7f454c46 ]]; }
extract_vmlinux() { # BZIMAGE OUT: find the compressed payload by its magic and unpack it
	local img=$1 out=$2 magic cmd pkg off
	local -A magics=([xz]='\xfd7zXZ\x00' [zstd]='\x28\xb5\x2f\xfd' [gzip]='\x1f\x8b\x08')
	local -A pkgs=([xz]=xz-utils [zstd]=zstd [gzip]=gzip)
	for cmd in xz zstd gzip; do
		grep -q "^CONFIG_KERNEL_${cmd^^}=y" "$KDIR/boot/config-$kver" 2>/dev/null || continue
		magic=${magics[$cmd]} pkg=${pkgs[$cmd]}
		command -v "$cmd" >/dev/null || apt_install "$pkg"
		for off in $(grep -aboP "$magic" "$img" | cut -d: -f1 | head -n 5); do
			# the payload is followed by other data: the decompressor complains, the output is whole
			tail -c "+$((off + 1))" "$img" | "$cmd" -dc >"$out" 2>/dev/null || true
			is_elf "$out" && return 0
		done
	done
	return 1
}
KERNEL=$VMLINUZ
if [[ $VM_PVH == 1 ]] && grep -q '^CONFIG_PVH=y' "$KDIR/boot/config-$kver" 2>/dev/null; then
	if [[ ! -f $KDIR/vmlinux-pvh ]]; then
		if extract_vmlinux "$VMLINUZ" "$KDIR/.vmlinux.tmp"; then
			mv "$KDIR/.vmlinux.tmp" "$KDIR/vmlinux-pvh"
		else
			rm -f "$KDIR/.vmlinux.tmp"
			log "kernel: could not unpack vmlinux from the bzImage; booting the bzImage (slower)"
		fi
	fi
	[[ -f $KDIR/vmlinux-pvh ]] && KERNEL=$KDIR/vmlinux-pvh
fi

# ---------------------------------------------------------------- 4. initramfs
t_initrd=$(now_us)
R=$OUT/root
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,etc/vmtest,proc,sys,dev,tmp,run,root,mnt,lib/modules,opt/mvps}

# Debian tools that replace busybox applets (busybox's mke2fs lacks most options).
host_tools=(mke2fs e2fsck tune2fs resize2fs dumpe2fs blkid)
declare -A skip_applet=([mkfs.ext2]=1 [mkfs.ext3]=1 [mkfs.ext4]=1 [fsck.ext2]=1 [fsck.ext3]=1 [fsck.ext4]=1)
for t in "${host_tools[@]}"; do skip_applet[$t]=1; done

# The applet links (about 400 ln calls, nearly a second) are made once per busybox binary.
bb_key=$(stat -L -c %s-%Y "$BUSYBOX")-$(printf '%s\n' "${!skip_applet[@]}" | sort | cksum | cut -d' ' -f1)
bb_tree=$VM_CACHE/busybox-$bb_key
if [[ ! -d $bb_tree ]]; then
	rm -rf "$VM_CACHE"/busybox-*
	mkdir -p "$bb_tree.tmp/bin"
	cp "$BUSYBOX" "$bb_tree.tmp/bin/busybox"
	while IFS= read -r applet; do
		[[ -n $applet && ${applet##*/} != busybox && -z ${skip_applet[${applet##*/}]:-} ]] || continue
		mkdir -p "$bb_tree.tmp/${applet%/*}"
		ln -sf /bin/busybox "$bb_tree.tmp/$applet"
	done < <("$BUSYBOX" --list-full)
	mv "$bb_tree.tmp" "$bb_tree"
fi
cp -a "$bb_tree/." "$R/"

# copy_elf SRC DST: a dynamic executable with the libraries ldd lists and the loader, at the
# same absolute paths.
copy_elf() {
	local src=$1 dst=$2 lib
	rm -f "$R$dst" # may be a busybox link
	install -D -m 755 "$src" "$R$dst"
	while IFS= read -r lib; do
		[[ -e $R$lib ]] || install -D -m 755 "$lib" "$R$lib"
	done < <(ldd "$src" 2>/dev/null | grep -o '/[^ ]*' || true)
}
for t in "${host_tools[@]}"; do
	src=$(PATH=/usr/sbin:/sbin:/usr/bin:/bin command -v "$t") || die "initramfs: $t not found on the host"
	copy_elf "$src" "/usr/sbin/$t"
done
for f in $VM_EXTRA_BINS; do
	[[ -x $f ]] || die "initramfs: VM_EXTRA_BINS: $f is not an executable"
	copy_elf "$f" "$f"
done
ln -s mke2fs "$R/usr/sbin/mkfs.ext4"
ln -s e2fsck "$R/usr/sbin/fsck.ext4"
[[ -f /etc/mke2fs.conf ]] && cp /etc/mke2fs.conf "$R/etc/"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$R/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$R/etc/group"
printf '127.0.0.1\tlocalhost\n::1\tlocalhost\n' >"$R/etc/hosts"
echo 'hosts: files dns' >"$R/etc/nsswitch.conf"
ln -s /proc/self/mounts "$R/etc/mtab"

# Kernel modules: modprobe --show-depends lists the insmod lines in load order (dependencies
# and soft dependencies first). A trailing ? marks a module that newer kernels may not have.
decompress_to() { # SRC DST
	case $1 in
	*.ko) cp "$1" "$2" ;;
	*.ko.xz)
		command -v xz >/dev/null || apt_install xz-utils
		xz -dc "$1" >"$2"
		;;
	*.ko.gz) gzip -dc "$1" >"$2" ;;
	*.ko.zst)
		command -v zstd >/dev/null || apt_install zstd
		zstd -q -dc "$1" >"$2"
		;;
	*) die "initramfs: unknown module format $1" ;;
	esac
}
declare -A mod_seen=()
mod_lines=()
required=()
for spec in crc32c_generic? ext4 "nbd nbds_max=16" $VM_MODULES; do
	read -r name params <<<"$spec"
	optional=0
	[[ $name == *\? ]] && optional=1 && name=${name%\?}
	# shellcheck disable=SC2086 # params are separate words
	if ! dep=$(modprobe -C /dev/null -d "$KDIR" -S "$kver" --show-depends "$name" $params 2>&1); then
		((optional)) && continue
		die "initramfs: module $name: $dep"
	fi
	while read -r kind path args; do
		case $kind in
		insmod)
			[[ -z ${mod_seen[$path]:-} ]] || continue
			mod_seen[$path]=1
			file=${path##*/}
			file=${file%.xz}
			file=${file%.gz}
			file=${file%.zst}
			decompress_to "$path" "$R/lib/modules/$file" || die "initramfs: cannot unpack $path"
			mod_lines+=("$file${args:+ $args}")
			;;
		builtin) ;;
		*) die "initramfs: unexpected modprobe output for $name: $kind $path $args" ;;
		esac
	done <<<"$dep"
	[[ $dep == builtin* ]] || ((optional)) || required+=("${name//-/_}")
done
printf '%s\n' "${mod_lines[@]}" >"$R/etc/vmtest/modules"
printf '%s\n' "${required[@]}" >"$R/etc/vmtest/required-modules"

mkdir -p "$R/opt/mvps/bin" "$R/opt/mvps/tests"
cp -a "$OUT/bin/." "$R/opt/mvps/bin/"
cp -a "$OUT/tests/." "$R/opt/mvps/tests/"
install -m 755 "$ROOT/vmtest/init.sh" "$R/init"

# /dev/console and /dev/null must exist before devtmpfs is mounted: the kernel opens
# /dev/console for /init's stdin/stdout. They are written as a second newc archive (the kernel
# unpacks concatenated archives), so neither mknod nor root is needed.
newc_entry() { # NAME MODE MAJOR MINOR: one newc header + name for an empty file or node
	local name=$1 mode=$2 rmaj=$3 rmin=$4 namesize=$((${#1} + 1))
	printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
		0 "$mode" 0 0 1 0 0 0 0 "$rmaj" "$rmin" "$namesize" 0
	printf '%s\0' "$name"
	# header (110 bytes) + name is padded to a multiple of 4
	local pad=$(((4 - (110 + namesize) % 4) % 4))
	((pad == 0)) || printf '%*s' "$pad" '' | tr ' ' '\0'
}
INITRD=$OUT/initrd.img
{
	(cd "$R" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet)
	newc_entry dev/console $((0020000 | 0600)) 5 1
	newc_entry dev/null $((0020000 | 0666)) 1 3
	newc_entry TRAILER!!! 0 0 0
} >"$OUT/initrd.cpio" || die "initramfs: cpio failed"
if [[ $VM_GZIP == 1 ]]; then
	gzip -1 -c "$OUT/initrd.cpio" >"$INITRD"
	rm "$OUT/initrd.cpio"
else
	mv "$OUT/initrd.cpio" "$INITRD"
fi
log "initramfs: $(du -h "$INITRD" | cut -f1)B, modules: $(printf '%s ' "${mod_lines[@]%% *}")"
t_prep_done=$(now_us)

# ---------------------------------------------------------------- 5. boot
# mitigations=off: about 0.5 s faster under TCG, and nothing to protect in a test VM.
append="console=ttyS0 panic=-1 oops=panic quiet mitigations=off mvps.timeout=$VM_TEST_TIMEOUT"
[[ -n $run_re ]] && append+=" mvps.run=$(printf '%s' "$run_re" | base64 -w0)"
[[ -n $VM_APPEND ]] && append+=" $VM_APPEND"
qemu=(qemu-system-x86_64 -accel "$VM_ACCEL" -cpu "$VM_CPU" -m "$VM_MEM" -smp "$VM_SMP"
	-nographic -no-reboot -kernel "$KERNEL" -initrd "$INITRD" -append "$append")
VMLOG=$OUT/vm.log
log "prep: $(secs "$t_locked" "$t_prep_done")s (packages $(secs "$t_locked" "$t_build")s, build $(secs "$t_build" "$t_kernel")s, kernel $(secs "$t_kernel" "$t_initrd")s, initramfs $(secs "$t_initrd" "$t_prep_done")s)"
log "boot: ${qemu[*]}"
echo "================================================================ guest console"

# Stream the serial console (without \r) to stdout and the log, noting the markers.
t_boot=$(now_us)
t_init='' t_result='' result='' summary='' panic=''
exec {log_fd}>"$VMLOG"
exec {qemu_fd}< <(exec timeout -k 10 "$VM_TIMEOUT" "${qemu[@]}" </dev/null 2>&1)
qemu_pid=$!
read_opts=()
while true; do
	line=
	if ! IFS= read -r "${read_opts[@]}" line <&"$qemu_fd"; then
		rc=$?
		if ((rc > 128)); then # no output for a while after the RESULT marker: stop qemu
			echo "vmtest: qemu did not exit after the result; killing it" >&2
			kill "$qemu_pid" 2>/dev/null || true
			break
		fi
		[[ -n $line ]] || break # EOF (a last line without newline is still processed)
	fi
	line=${line//$'\r'/}
	line=${line//$'\e'c/}                     # terminal reset and
	line=${line//$'\e'\[*([0-9;?])[a-zA-Z]/} # ANSI sequences from the firmware
	printf '%s\n' "$line"
	printf '%s\n' "$line" >&"$log_fd"
	case $line in
	*"vmtest: init started"*) t_init=$(now_us) ;;
	"RESULT: "*)
		result=${line#RESULT: }
		t_result=$(now_us)
		read_opts=(-t 20)
		;;
	"vmtest: "*" passed, "*" failed") summary=${line#vmtest: } ;;
	*"Kernel panic"*) panic="Kernel panic${line#*Kernel panic}" ;;
	esac
done
qemu_rc=0
wait "$qemu_pid" || qemu_rc=$?
qemu_pid=
exec {qemu_fd}<&- {log_fd}>&-
t_end=$(now_us)
echo "================================================================"

t_init_s=never t_result_s=never
[[ -n $t_init ]] && t_init_s=$(secs "$t_boot" "$t_init")s
[[ -n $t_result ]] && t_result_s=$(secs "$t_boot" "$t_result")s
log "timing: prep $(secs "$t_locked" "$t_prep_done")s, boot-to-/init $t_init_s, boot-to-result $t_result_s, qemu $(secs "$t_boot" "$t_end")s, total $(secs "$t_start" "$t_end")s"
log "log: $VMLOG"
if [[ $result == PASS ]]; then
	# Last line, in the plain "N passed, N failed" form CI reads.
	log "$summary"
	exit 0
fi
if [[ $result == FAIL && $summary == "0 passed, 0 failed" ]]; then
	die "no test ran (does -run '$run_re' match any test?)"
elif [[ $result == FAIL ]]; then
	die "tests FAILED (${summary:-no summary})"
elif ((qemu_rc == 124 || qemu_rc == 137)); then
	die "VM timed out after ${VM_TIMEOUT}s without a RESULT line (VM_TIMEOUT)"
elif [[ -n $panic ]]; then
	die "guest kernel panic, no RESULT line: $panic"
elif [[ -n $result ]]; then
	die "unexpected result '$result'"
else
	die "qemu exited with status $qemu_rc without a RESULT line (crash? see output above)"
fi
