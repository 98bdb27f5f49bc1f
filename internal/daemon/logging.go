package daemon

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync"
	"syscall"
)

// Log formats of PROVISIONER_LOG_FORMAT.
const (
	LogText = "text"
	LogJSON = "json"
)

// NewLogger is the daemon's logger, writing to f in format (text or json)
// at level and above. When f is the stream journald gave the process
// (JOURNAL_STREAM, see systemd.exec(5)), every line starts with its
// syslog priority in sd-daemon(3)'s form, "<3>" for an error, so that
// journald files it at that priority and journalctl -p finds it; elsewhere
// (a terminal, a container's log) lines are left as they are.
func NewLogger(f *os.File, format, level string, getenv func(string) string) *slog.Logger {
	var lvl slog.Level
	// ParseConfig has checked it.
	lvl.UnmarshalText([]byte(strings.ToUpper(level)))
	if !journalStream(f, getenv("JOURNAL_STREAM")) {
		return slog.New(newHandler(f, format, lvl))
	}
	sink := &prioritySink{out: f}
	return slog.New(&priorityHandler{inner: newHandler(&sink.buf, format, lvl), sink: sink})
}

func newHandler(w io.Writer, format string, level slog.Level) slog.Handler {
	opts := &slog.HandlerOptions{Level: level}
	if format == LogJSON {
		return slog.NewJSONHandler(w, opts)
	}
	return slog.NewTextHandler(w, opts)
}

// journalStream tells whether f is the stream JOURNAL_STREAM names
// ("device:inode"). The variable alone is not enough: it is inherited by
// whatever the service starts, with its output sent elsewhere.
func journalStream(f *os.File, stream string) bool {
	if stream == "" {
		return false
	}
	var dev, ino uint64
	if _, err := fmt.Sscanf(stream, "%d:%d", &dev, &ino); err != nil {
		return false
	}
	fi, err := f.Stat()
	if err != nil {
		return false
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	return ok && uint64(st.Dev) == dev && uint64(st.Ino) == ino
}

// Priority is the syslog priority of a level (sd-daemon(3): 3 err,
// 4 warning, 6 info, 7 debug).
func Priority(level slog.Level) int {
	switch {
	case level >= slog.LevelError:
		return 3
	case level >= slog.LevelWarn:
		return 4
	case level >= slog.LevelInfo:
		return 6
	}
	return 7
}

// prioritySink collects one record's line from the inner handler, so that
// the priority can go in front of it, and writes both at once.
type prioritySink struct {
	mu  sync.Mutex
	buf bytes.Buffer
	out io.Writer
}

// priorityHandler puts each record's syslog priority in front of the line
// its inner handler writes. Handlers derived with WithAttrs and WithGroup
// share the sink, and so its lock.
type priorityHandler struct {
	inner slog.Handler
	sink  *prioritySink
}

func (h *priorityHandler) Enabled(ctx context.Context, level slog.Level) bool {
	return h.inner.Enabled(ctx, level)
}

func (h *priorityHandler) Handle(ctx context.Context, r slog.Record) error {
	s := h.sink
	s.mu.Lock()
	defer s.mu.Unlock()
	s.buf.Reset()
	fmt.Fprintf(&s.buf, "<%d>", Priority(r.Level))
	prefix := s.buf.Len()
	if err := h.inner.Handle(ctx, r); err != nil {
		return err
	}
	if s.buf.Len() == prefix {
		return nil
	}
	_, err := s.out.Write(s.buf.Bytes())
	return err
}

func (h *priorityHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return &priorityHandler{inner: h.inner.WithAttrs(attrs), sink: h.sink}
}

func (h *priorityHandler) WithGroup(name string) slog.Handler {
	return &priorityHandler{inner: h.inner.WithGroup(name), sink: h.sink}
}
