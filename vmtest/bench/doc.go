// Package bench is the VM benchmark behind make bench: attach and detach latency, concurrency
// and scale, throughput and start-up of the provisioner against Debian's nbd-client and an
// in-process floor, all on one mvps-te-dev engine inside the VM.
//
// Its test, TestBench, lives in a file whose first line is "//go:build vmtest" and runs only
// with MVPS_BENCH=1 in the guest's environment (make bench puts it on the kernel command line
// through VM_APPEND; the kernel hands it to /init). The driver of make integration leaves this
// package out (vmrun's manualPackages). Run it with
//
//	make bench                  (or: bash vmtest/bench.sh)
//
// which prints one table and writes the numbers as JSON under .cache/bench/.
package bench
