#!/bin/sh
# /init of the vmtest initramfs: busybox sh as PID 1 in the guest. Written into the initramfs
# and booted by vmtest/vmrun (the go test -exec runner), which boots one VM per test binary.
#
# It mounts the pseudo file systems, loads the kernel modules listed in /etc/vmtest/modules
# (dependencies first), brings up lo, runs the test binary named in /etc/vmtest/test with the
# arguments in /etc/vmtest/args (one per line, base64) in a fresh directory, kills what it
# left behind and powers the VM off. Two serial ports:
#   ttyS0  the console: the kernel's messages and this script's
#   ttyS1  the test binary's output, then a last line "vmrun-exit: N" (its exit code), or
#          "vmrun-exit: setup-failed"; the runner exits with N.
# shellcheck shell=sh

export PATH=/opt/mvps/bin:/bin:/sbin:/usr/bin:/usr/sbin
export MVPS_VM=1 MVPS_BIN_DIR=/opt/mvps/bin TMPDIR=/tmp HOME=/tmp
umask 022
cd /

# --- file systems
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
ln -sf /proc/self/fd /dev/fd
ln -sf fd/0 /dev/stdin
ln -sf fd/1 /dev/stdout
ln -sf fd/2 /dev/stderr
hostname vmtest

uptime_s() { cut -d' ' -f1 /proc/uptime; }
echo # the firmware's last line has no newline
echo "vmtest: init started, kernel $(uname -r), uptime $(uptime_s)s, $(nproc) cpu(s), $(awk '/^MemTotal/ {print int($2/1024)}' /proc/meminfo) MB"

out=/dev/ttyS1
# raw: the test output reaches the host byte for byte (no \n -> \r\n)
stty -F "$out" raw -echo || echo "vmtest: WARNING: stty raw on $out failed"

# --- kernel modules and network
setup_failed=0
while read -r mod params; do # one line per module: FILE [PARAMS...], dependencies first
	[ -n "$mod" ] || continue
	# shellcheck disable=SC2086 # params are separate words
	insmod "/lib/modules/$mod" $params || echo "vmtest: WARNING: insmod $mod $params failed"
done </etc/vmtest/modules
while read -r m; do
	[ -z "$m" ] || [ -d "/sys/module/$m" ] || {
		echo "vmtest: SETUP ERROR: module $m is not loaded"
		setup_failed=1
	}
done </etc/vmtest/required-modules
ip link set lo up || {
	echo "vmtest: SETUP ERROR: ip link set lo up failed"
	setup_failed=1
}
echo "vmtest: setup done, uptime $(uptime_s)s"

finish() { # MARKER: the last line of the test channel, then power off
	# The last close of a serial port waits until its output is sent: the marker is out
	# when printf's redirection ends.
	printf '\nvmrun-exit: %s\n' "$1" >"$out"
	sync
	poweroff -f
}
[ "$setup_failed" = 0 ] || finish setup-failed

# --- the test binary, in a fresh directory, with its arguments
read -r t </etc/vmtest/test
name=${t##*/}
name=${name%.test}
dir=/tmp/vmtest/$name
mkdir -p "$dir"
[ -d "/opt/mvps/tests/$name.testdata" ] && cp -a "/opt/mvps/tests/$name.testdata" "$dir/testdata"
set --
while read -r a; do
	set -- "$@" "$(printf '%s' "$a" | base64 -d)"
done </etc/vmtest/args
echo "vmtest: running $name.test $*"
# In the foreground: an asynchronous command would start with SIGINT and SIGQUIT ignored.
(cd "$dir" && exec "$t" "$@") </dev/null >"$out" 2>&1
rc=$?
echo "vmtest: $name.test exit code $rc, uptime $(uptime_s)s"

# SIGKILL every user process the test left behind (kernel threads have no exe).
left=
for p in /proc/[0-9]*; do
	pid=${p#/proc/}
	[ "$pid" = 1 ] || [ "$pid" = $$ ] || [ ! -e "$p/exe" ] && continue
	comm=
	read -r comm <"$p/comm" 2>/dev/null
	left="$left $pid($comm)"
	kill -KILL "$pid" 2>/dev/null
done
[ -z "$left" ] || echo "vmtest: killed processes left behind by the test:$left"
finish "$rc"
