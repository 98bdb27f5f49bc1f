#!/bin/sh
# /init of the vmtest initramfs: busybox sh as PID 1 in the guest. Built and booted by
# vmtest/run.sh, which reads the serial console and waits for the final RESULT line.
#
# It mounts the pseudo file systems, loads the kernel modules listed in /etc/vmtest/modules,
# runs every Go test binary in /opt/mvps/tests (each in a fresh directory under /tmp), prints
#   vmtest: N passed, N failed      (top-level tests: "--- PASS:" / "--- FAIL:" lines)
#   RESULT: PASS | RESULT: FAIL
# and powers the VM off. Options come from the kernel command line:
#   mvps.run=BASE64      -test.run regexp, base64-encoded (any byte survives the cmdline)
#   mvps.timeout=DUR     -test.timeout of each test binary (default 300s)
# VM_TEST_RUN / VM_TEST_TIMEOUT given as plain kernel parameters (they reach init's
# environment) work as well.
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

# --- options from the kernel command line
read -r cmdline </proc/cmdline
set -f # no globbing of a regexp
for arg in $cmdline; do
	case $arg in
	mvps.run=*) VM_TEST_RUN=$(echo "${arg#mvps.run=}" | base64 -d) ;;
	mvps.timeout=*) VM_TEST_TIMEOUT=${arg#mvps.timeout=} ;;
	esac
done
set +f
VM_TEST_TIMEOUT=${VM_TEST_TIMEOUT:-300s}
[ -n "${VM_TEST_RUN:-}" ] && echo "vmtest: -test.run $VM_TEST_RUN"

# --- kernel modules and network
setup_failed=0
if [ -f /etc/vmtest/modules ]; then
	# one line per module: FILE [PARAMS...], dependencies first
	while read -r mod params; do
		[ -n "$mod" ] || continue
		# shellcheck disable=SC2086 # params are separate words
		insmod "/lib/modules/$mod" $params || echo "vmtest: WARNING: insmod $mod $params failed"
	done </etc/vmtest/modules
fi
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

# kill_leftovers PID: SIGKILL every user process except init and PID (the tee), so that each
# test binary starts clean and nothing keeps the console fifo open.
kill_leftovers() {
	left=
	for p in /proc/[0-9]*; do
		pid=${p#/proc/}
		[ "$pid" = 1 ] || [ "$pid" = "$1" ] || [ ! -e "$p/exe" ] && continue # kernel threads have no exe
		comm=
		read -r comm <"$p/comm" 2>/dev/null
		left="$left $pid($comm)"
		kill -KILL "$pid" 2>/dev/null
	done
	[ -z "$left" ] || echo "vmtest: killed processes left behind by the test:$left"
}

# --- tests
fifo=/run/vmtest/console.fifo
passed=0 failed=0 skipped=0 bins=0 bins_failed=0
mkdir -p /run/vmtest
for t in /opt/mvps/tests/*.test; do
	[ -x "$t" ] || continue
	name=${t##*/}
	name=${name%.test}
	bins=$((bins + 1))
	dir=/tmp/vmtest/$name
	log=/run/vmtest/$name.log
	rm -rf "$dir"
	mkdir -p "$dir"
	[ -d "/opt/mvps/tests/$name.testdata" ] && cp -a "/opt/mvps/tests/$name.testdata" "$dir/testdata"
	echo "=== vmtest: $name (uptime $(uptime_s)s)"
	t0=$(uptime_s)
	# The test writes into a fifo that tee copies to the console and the log. Not a plain pipe:
	# a process the test leaves behind would keep the pipe open and hang us; here it is killed.
	rm -f "$fifo"
	mkfifo "$fifo"
	tee "$log" <"$fifo" &
	tee_pid=$!
	# In the foreground: an asynchronous command would start with SIGINT and SIGQUIT ignored.
	(
		cd "$dir" || exit 127
		if [ -n "${VM_TEST_RUN:-}" ]; then
			exec "$t" -test.v -test.timeout="$VM_TEST_TIMEOUT" -test.run "$VM_TEST_RUN"
		else
			exec "$t" -test.v -test.timeout="$VM_TEST_TIMEOUT"
		fi
	) </dev/null >"$fifo" 2>&1
	rc=$?
	kill_leftovers "$tee_pid"
	wait "$tee_pid"
	p=$(grep -c '^--- PASS: ' "$log")
	f=$(grep -c '^--- FAIL: ' "$log")
	s=$(grep -c '^--- SKIP: ' "$log")
	if [ "$rc" != 0 ]; then
		bins_failed=$((bins_failed + 1))
		# a panic, a -test.timeout or a crash fails the binary without a "--- FAIL:" line
		[ "$f" -gt 0 ] || f=1
	fi
	passed=$((passed + p))
	failed=$((failed + f))
	skipped=$((skipped + s))
	echo "=== vmtest: $name exit code $rc: $p passed, $f failed, $s skipped in $(awk "BEGIN {printf \"%.1f\", $(uptime_s) - $t0}")s"
done

# --- summary
echo "vmtest: $bins test binaries ($bins_failed failed), $skipped tests skipped, uptime $(uptime_s)s"
echo "vmtest: $passed passed, $failed failed"
result=PASS
if [ "$setup_failed" != 0 ]; then
	echo "vmtest: setup failed (see SETUP ERROR above)"
	result=FAIL
fi
if [ "$bins" = 0 ]; then
	echo "vmtest: no test binaries in /opt/mvps/tests"
	result=FAIL
elif [ "$passed" = 0 ] && [ "$failed" = 0 ]; then
	echo "vmtest: no test passed (does -run match anything?)"
	result=FAIL
fi
[ "$failed" = 0 ] && [ "$bins_failed" = 0 ] || result=FAIL
echo "RESULT: $result"
sync
# The serial console is written synchronously enough, but give the UART a moment to drain
# before the power goes off (the kernel's "reboot: Power down" arrives after RESULT).
sleep 0.1
poweroff -f
