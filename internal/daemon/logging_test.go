package daemon

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
)

// journalFile is a file standing in for journald's stream, with the
// JOURNAL_STREAM value that names it.
func journalFile(t *testing.T) (*os.File, string) {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "journal"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	return f, fmt.Sprintf("%d:%d", uint64(st.Dev), uint64(st.Ino))
}

func lines(t *testing.T, f *os.File) []string {
	t.Helper()
	b, err := os.ReadFile(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	return strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
}

// Under journald each line starts with the syslog priority of its level,
// as sd-daemon(3) has it, in either format and through derived loggers;
// the rest of the line is the format's own.
func TestJournalPriorityPrefixes(t *testing.T) {
	for _, format := range []string{LogText, LogJSON} {
		t.Run(format, func(t *testing.T) {
			f, stream := journalFile(t)
			env := map[string]string{"JOURNAL_STREAM": stream}
			log := NewLogger(f, format, "debug", func(k string) string { return env[k] })
			log.Debug("d")
			log.Info("i")
			log.Warn("w")
			log.With("image", "demo").WithGroup("g").Error("e", "k", "multi\nline")
			got := lines(t, f)
			want := []string{"<7>", "<6>", "<4>", "<3>"}
			if len(got) != len(want) {
				t.Fatalf("%d lines, want %d: %q", len(got), len(want), got)
			}
			for i, line := range got {
				rest, ok := strings.CutPrefix(line, want[i])
				if !ok {
					t.Errorf("line %d %q lacks the prefix %s", i, line, want[i])
					continue
				}
				if format == LogJSON && json.Unmarshal([]byte(rest), new(map[string]any)) != nil {
					t.Errorf("line %d after its prefix is not JSON: %q", i, rest)
				}
				if format == LogText && !strings.HasPrefix(rest, "time=") {
					t.Errorf("line %d after its prefix is not logfmt: %q", i, rest)
				}
			}
			if !strings.Contains(got[3], "image") || !strings.Contains(got[3], "g.k") && !strings.Contains(got[3], `"g":{"k"`) {
				t.Errorf("the derived logger lost its attributes or group: %q", got[3])
			}
		})
	}
}

// Concurrent records never mix their prefixes and lines.
func TestJournalPrefixesUnderConcurrency(t *testing.T) {
	f, stream := journalFile(t)
	log := NewLogger(f, LogText, "info", func(k string) string { return map[string]string{"JOURNAL_STREAM": stream}[k] })
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l := log.With("g", g)
			for range 50 {
				if g%2 == 0 {
					l.Error("even")
				} else {
					l.Info("odd")
				}
			}
		}()
	}
	wg.Wait()
	got := lines(t, f)
	if len(got) != 400 {
		t.Fatalf("%d lines, want 400", len(got))
	}
	for _, line := range got {
		if !(strings.HasPrefix(line, "<3>") && strings.Contains(line, "msg=even") ||
			strings.HasPrefix(line, "<6>") && strings.Contains(line, "msg=odd")) {
			t.Fatalf("mixed line %q", line)
		}
	}
}

// Only the very stream journald gave gets prefixes: a JOURNAL_STREAM
// inherited by a process whose output goes elsewhere, or none, leaves the
// lines as they are; and the level filters as it should.
func TestNoPrefixesOffTheJournal(t *testing.T) {
	f, _ := journalFile(t)
	_, other := journalFile(t)
	for _, stream := range []string{"", other, "garbage"} {
		if journalStream(f, stream) {
			t.Errorf("JOURNAL_STREAM=%q taken for this file's", stream)
		}
	}
	log := NewLogger(f, LogText, "warn", func(k string) string { return map[string]string{"JOURNAL_STREAM": other}[k] })
	log.Info("dropped")
	log.Warn("kept")
	got := lines(t, f)
	if len(got) != 1 || !strings.HasPrefix(got[0], "time=") || !strings.Contains(got[0], "msg=kept") {
		t.Fatalf("lines %q, want the warning alone, unprefixed", got)
	}
}

func TestPriority(t *testing.T) {
	for level, want := range map[slog.Level]int{
		slog.LevelDebug - 4: 7, slog.LevelDebug: 7, slog.LevelInfo: 6, slog.LevelInfo + 2: 6,
		slog.LevelWarn: 4, slog.LevelError: 3, slog.LevelError + 4: 3,
	} {
		if got := Priority(level); got != want {
			t.Errorf("Priority(%v) = %d, want %d", level, got, want)
		}
	}
}
