// Package procfs reads the per-process files of /proc that the daemon and
// its tests look at, each parsed in one place: the command name in stat
// may hold spaces and parentheses, status lines are "Name:\tvalue", and
// mountinfo escapes the blanks of its paths.
package procfs

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
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
//
// It is read on every attach's path: one open, one read into a buffer on
// the stack and a close, with nothing split into fields; a line longer
// than the buffer (a command name of kernel threads' length and more) is
// read whole.
func StartTime(pid int) (uint64, error) {
	var buf [512]byte
	line, err := readSmall("/proc/"+strconv.Itoa(pid)+"/stat", buf[:])
	if err != nil {
		return 0, fmt.Errorf("process stat: %w", err)
	}
	start, err := parseStartTime(line)
	if err != nil {
		return 0, fmt.Errorf("process stat of %d: %w", pid, err)
	}
	return start, nil
}

// parseStartTime finds field 22 in a line of /proc/<pid>/stat.
func parseStartTime(line []byte) (uint64, error) {
	// The command name may hold spaces and parentheses: what follows
	// starts after its last ')', with the state, field 3.
	i := bytes.LastIndexByte(line, ')')
	if i < 0 {
		return 0, errors.New("no command name")
	}
	// Field 3 on, the start time the 20th of them.
	rest := line[i+1:]
	for n := 0; ; n++ {
		rest = bytes.TrimLeft(rest, " ")
		end := bytes.IndexAny(rest, " \n")
		if end < 0 {
			end = len(rest)
		}
		if n == 19 {
			rest = rest[:end]
			break
		}
		if end == len(rest) {
			return 0, fmt.Errorf("%d fields, the start time is field 22", n+3)
		}
		rest = rest[end:]
	}
	start, err := strconv.ParseUint(string(rest), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("start time: %w", err)
	}
	return start, nil
}

// readSmall reads the file at path into buf when it fits, in one read, and
// reads it whole otherwise.
func readSmall(path string, buf []byte) ([]byte, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	n, err := unix.Read(fd, buf)
	unix.Close(fd)
	if err != nil {
		return nil, &os.PathError{Op: "read", Path: path, Err: err}
	}
	if n < len(buf) {
		return buf[:n], nil
	}
	return os.ReadFile(path)
}

// MountPoints lists where this process's mount namespace has mounted the
// file system of device dev (its st_dev, as major:minor in mountinfo).
func MountPoints(dev uint64) ([]string, error) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	want := fmt.Sprintf("%d:%d", unix.Major(dev), unix.Minor(dev))
	var points []string
	for line := range strings.Lines(string(data)) {
		// id parent major:minor root mount-point options ...
		fields := strings.Fields(line)
		if len(fields) < 5 || fields[2] != want {
			continue
		}
		points = append(points, unescapeMountinfo(fields[4]))
	}
	return points, nil
}

// unescapeMountinfo undoes the kernel's octal escapes of space, tab,
// newline and backslash in a mountinfo path.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) && isOctal(s[i+1]) && isOctal(s[i+2]) && isOctal(s[i+3]) {
			b.WriteByte((s[i+1]-'0')<<6 | (s[i+2]-'0')<<3 | (s[i+3] - '0'))
			i += 3
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isOctal(c byte) bool { return '0' <= c && c <= '7' }
