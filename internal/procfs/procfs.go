// Package procfs reads the per-process files of /proc that the daemon and
// its tests look at, each parsed in one place: the command name in stat
// may hold spaces and parentheses, and status lines are "Name:\tvalue".
package procfs

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// Status returns the "Name:\tvalue" lines of /proc/<pid>/status as a map,
// the values trimmed ("VmRSS" is "1234 kB"). For the process itself it
// shows the main thread, which is what the kernel reports for the process.
func Status(pid int) (map[string]string, error) {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return nil, fmt.Errorf("process status: %w", err)
	}
	defer f.Close()
	fields := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), ":"); ok {
			fields[k] = strings.TrimSpace(v)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("process status of %d: %w", pid, err)
	}
	return fields, nil
}

// Stat returns the fields of /proc/<pid>/stat that follow the command
// name: [0] is the state (field 3 in proc(5)), [1] the parent pid, [19]
// the start time.
func Stat(pid int) ([]string, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return nil, fmt.Errorf("process stat: %w", err)
	}
	// The command name may hold spaces and parentheses: what follows
	// starts after its last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return nil, fmt.Errorf("process stat of %d: no command name", pid)
	}
	return strings.Fields(string(b[i+1:])), nil
}

// Children lists the processes whose parent is pid, by one pass over /proc.
func Children(pid int) []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	parent := strconv.Itoa(pid)
	var kids []int
	for _, e := range entries {
		child, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if f, err := Stat(child); err == nil && len(f) > 1 && f[1] == parent {
			kids = append(kids, child)
		}
	}
	return kids
}

// Alive reports whether pid is a process that has not exited (a zombie
// has).
func Alive(pid int) bool {
	f, err := Stat(pid)
	return err == nil && len(f) > 0 && f[0] != "Z"
}

// StartTime is the start time of process pid in clock ticks after boot
// (field 22 of /proc/<pid>/stat): with the pid, it names one process for
// good, as a pid alone does not once it is reused.
func StartTime(pid int) (uint64, error) {
	fields, err := Stat(pid)
	if err != nil {
		return 0, err
	}
	if len(fields) < 20 {
		return 0, fmt.Errorf("process stat of %d: %d fields", pid, len(fields))
	}
	return strconv.ParseUint(fields[19], 10, 64)
}
