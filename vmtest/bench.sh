#!/usr/bin/env bash
# vmtest/bench.sh (make bench): the Go micro-benchmarks on the host, then the VM benchmark
# (vmtest/bench, TestBench) in one VM. Prints one table; writes the VM numbers as JSON and the
# Go benchmark output (benchstat format) under .cache/bench/ so that two runs can be compared.
#
# Knobs: BENCH_N (attach/detach cycles per row, default 200), BENCH_KILL_N (SIGKILL cycles,
# 30), BENCH_FIO_RUNTIME (seconds per random fio job, 3), BENCH_GOTIME (go test -benchtime,
# 200ms), BENCH_ONLY (a comma list of the VM sections to run: startup, attach, kill,
# concurrency, throughput; all by default), BENCH_ENGINE_LISTEN (the engine on a loopback TCP
# address such as 127.0.0.1:10809 instead of a Unix socket, for every row),
# BENCH_CLOCKSOURCE (the guest's clock source: tsc by default, empty for the guest kernel's own
# choice), BENCH_PERF=1 (perf samples the whole guest during the attach rows and prints where the
# time went by process and function), BENCH_KTRACE=1 (ftrace times the calls inside the
# kernel's netlink connect during the floor and fd rows), and vmrun's own (VM_SMP, VM_MEM, ...; .cache/vmrun -h).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH=$PATH:/usr/local/go/bin:/usr/sbin:/sbin
GO=${GO:-go}

# Debian's nbd-client (the seed's attach path, the baseline) and fio, copied into the guest.
missing=
for p in nbd-client fio ${BENCH_PERF:+linux-perf}; do
	dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' || missing="$missing $p"
done
if [ -n "$missing" ]; then
	echo "bench: installing Debian packages:$missing"
	apt-get -o DPkg::Lock::Timeout=300 update -qq
	DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends $missing >/dev/null
fi

out=.cache/bench
mkdir -p "$out"
ts=$(date -u +%Y%m%dT%H%M%SZ)

echo "== Go benchmarks on the host (-benchtime ${BENCH_GOTIME:-200ms})"
"$GO" test -run '^$' -bench . -benchmem -benchtime "${BENCH_GOTIME:-200ms}" \
	./provision ./provision/protocol ./provision/engine ./provision/imageconfig ./handshake >"$out/$ts.gobench.txt" 2>&1 || {
	cat "$out/$ts.gobench.txt"
	exit 1
}
grep -E '^(goos|goarch|cpu|pkg|Benchmark)' "$out/$ts.gobench.txt" | grep -vE '^(goos|goarch)' | uniq

echo
echo "== VM benchmark (vmtest/bench; console and progress in $out/$ts.log)"
"$GO" build -o .cache/vmrun ./vmtest/vmrun
# Two vCPUs, as a host has more than one (the first measurement in the issue that asked for
# this benchmark used two as well), and nbd loaded as deploy/modprobe.d loads it.
export VM_SMP=${VM_SMP:-2} VM_MODULE_PARAMS=${VM_MODULE_PARAMS-nbd.max_part=0}
# The guest reads time as a host does, from the TSC through the vDSO. Under TCG its kernel does
# not trust the emulated TSC and falls back to the HPET, where every clock read is a system call
# and an emulated device read: 2.4 us against 0.27 us, measured in the guest. Go's runtime reads
# the clock at every turn of its scheduler, so the HPET charged each hand-off between goroutines
# and processes far more than a host does, the daemon's more than the in-process floor's.
clock=${BENCH_CLOCKSOURCE-tsc}
case "$clock" in
'') ;;
tsc) VM_APPEND="clocksource=tsc tsc=reliable ${VM_APPEND:-}" ;;
*) VM_APPEND="clocksource=$clock ${VM_APPEND:-}" ;;
esac
# vmrun boots its guests with transparent_hugepage=never (docs/testing.md: a starved khugepaged
# stalled the 7.x suite); the benchmark keeps what the kernel does on a host, THP always (the
# last such argument wins), so that its runs compare with those before.
VM_APPEND="transparent_hugepage=always ${VM_APPEND:-}"
extra=
if [ "${BENCH_PERF:-}" = 1 ]; then
	extra="$extra MVPS_BENCH_PERF=1"
	VM_EXTRA_BINS="$(command -v perf) ${VM_EXTRA_BINS:-}"
fi
if [ "${BENCH_KTRACE:-}" = 1 ]; then extra="$extra MVPS_BENCH_KTRACE=1"; fi
log=$out/$ts.log
set +e
VM_EXTRA_BINS="/usr/sbin/nbd-client /usr/bin/fio ${VM_EXTRA_BINS:-}" \
	VM_APPEND="MVPS_BENCH=1 MVPS_BENCH_N=${BENCH_N:-200} MVPS_BENCH_KILL_N=${BENCH_KILL_N:-30} MVPS_BENCH_FIO_RUNTIME=${BENCH_FIO_RUNTIME:-3} ${BENCH_ONLY:+MVPS_BENCH_ONLY=$BENCH_ONLY}${BENCH_ENGINE_LISTEN:+ MVPS_BENCH_ENGINE_LISTEN=$BENCH_ENGINE_LISTEN}$extra ${VM_APPEND:-}" \
	CGO_ENABLED=0 "$GO" test -v -tags vmtest -count=1 -timeout 40m -exec "$PWD/.cache/vmrun" \
	-run '^TestBench$' ./vmtest/bench >"$log" 2>&1
rc=$?
set -e
if [ "$rc" != 0 ] || ! grep -q '^BENCH-JSON ' "$log"; then
	echo "bench: FAILED (exit $rc); the last lines of $log:"
	tail -40 "$log"
	exit 1
fi
sed -n '/^mvps-provisioner benchmark:/,/^BENCH-JSON /p' "$log" | grep -v "^BENCH-JSON "
sed -n 's/^BENCH-JSON //p' "$log" >"$out/$ts.json"
echo
echo "== against the latest earlier complete run on the same machine line"
"$GO" test -v -count=1 -run '^TestCompare$' ./vmtest/bench -args "$PWD/$out" "$PWD/$out/$ts.json" |
	grep -Ev '^(=== RUN|--- PASS|PASS|ok )' || true
echo
echo "bench: wrote $out/$ts.json and $out/$ts.gobench.txt (benchstat compares the *.gobench.txt of two runs)"
