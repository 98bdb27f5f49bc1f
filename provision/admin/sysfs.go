package admin

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// ReadIOStats reads the counters of dev (/dev/nbdX) from sysBlock/nbdX/stat.
func ReadIOStats(sysBlock, dev string) (*IOStats, error) {
	b, err := os.ReadFile(filepath.Join(sysBlock, filepath.Base(dev), "stat"))
	if err != nil {
		return nil, err
	}
	return parseStat(string(b))
}

// parseStat reads the fields of a block device's stat file: 11 of them
// since Linux 2.6, 15 with discards (4.18), 17 with flushes (5.5).
func parseStat(s string) (*IOStats, error) {
	f := strings.Fields(s)
	if len(f) < 11 {
		return nil, fmt.Errorf("block stat has %d fields, want at least 11", len(f))
	}
	n := make([]uint64, len(f))
	for i, v := range f {
		x, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("block stat field %d: %q is not a number", i+1, v)
		}
		n[i] = x
	}
	st := &IOStats{
		ReadIOs: n[0], ReadBytes: n[2] * 512,
		WriteIOs: n[4], WriteBytes: n[6] * 512,
		InFlight: n[8], IOTicksMS: n[9],
	}
	if len(n) >= 17 {
		st.FlushIOs = n[15]
	}
	return st, nil
}
