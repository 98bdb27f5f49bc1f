package engine

import (
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
)

// recorded is one record the provisioner logged.
type recorded struct {
	level slog.Level
	msg   string
	attrs map[string]string
}

// recorder is a slog.Handler that keeps what it is given.
type recorder struct {
	mu      sync.Mutex
	records []recorded
}

func (h *recorder) Enabled(context.Context, slog.Level) bool { return true }
func (h *recorder) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h *recorder) WithGroup(string) slog.Handler            { return h }
func (h *recorder) Handle(_ context.Context, r slog.Record) error {
	rec := recorded{level: r.Level, msg: r.Message, attrs: map[string]string{}}
	r.Attrs(func(a slog.Attr) bool { rec.attrs[a.Key] = a.Value.String(); return true })
	h.mu.Lock()
	h.records = append(h.records, rec)
	h.mu.Unlock()
	return nil
}

// feed gives the lines of text to a reader of stream and returns what was
// logged once the stream ended.
func feed(stream, text string) []recorded {
	h := &recorder{}
	lr := newLogReader(slog.New(h), stream)
	for _, line := range strings.Split(strings.TrimSuffix(text, "\n"), "\n") {
		lr.line(line)
	}
	lr.end()
	return h.records
}

// mvps-te's own output, as tracing-subscriber's pretty format writes it
// (mvps-te/src/main.rs and session_manager.rs log these), each record at
// its level; the third in colour, as an engine that ignores NO_COLOR
// would write it.
const prettyOutput = `  2026-01-02T03:04:05.000001Z TRACE mvps_te::layered_store: page lookup, page: 7
    at mvps-te/src/layered_store.rs:120
    in mvps_te::session_manager::session with image_id: demo.mvps-image

  2026-01-02T03:04:05.000002Z DEBUG mvps_te::session_manager: checkpoint scheduled
    at mvps-te/src/session_manager.rs:301

  2026-01-02T03:04:05.000003Z ` + "\x1b[32m INFO\x1b[0m \x1b[1;32mmvps_te\x1b[0m\x1b[32m: starting mvps-te\x1b[0m" + `
    ` + "\x1b[2;3mat\x1b[0m" + ` mvps-te/src/main.rs:167

  2026-01-02T03:04:05.000004Z  WARN mvps_te::nbd: unsupported nbd option during handshake, option: 7
    at mvps-te/src/nbd.rs:85

  2026-01-02T03:04:05.000005Z ERROR mvps_te::session_manager: failed to open image store, image_id: demo.mvps-image, error: failed to read image info

Caused by:
    0: No such file or directory (os error 2)
    at mvps-te/src/session_manager.rs:199
    in mvps_te::session_manager::session_loop with image_id: demo.mvps-image
    in mvps_te::session_manager::session

`

func TestPrettyRecordsAtTheirLevels(t *testing.T) {
	got := feed("stdout", prettyOutput)
	want := []struct {
		level slog.Level
		msg   string
	}{
		{slog.LevelDebug, "engine: page lookup, page: 7"},
		{slog.LevelDebug, "engine: checkpoint scheduled"},
		{slog.LevelInfo, "engine: starting mvps-te"},
		{slog.LevelWarn, "engine: unsupported nbd option during handshake, option: 7"},
		{slog.LevelError, "engine: failed to open image store, image_id: demo.mvps-image, error: failed to read image info"},
	}
	if len(got) != len(want) {
		t.Fatalf("%d records logged, want %d (each record once): %+v", len(got), len(want), got)
	}
	for i, w := range want {
		if got[i].level != w.level || got[i].msg != w.msg {
			t.Errorf("record %d: %v %q, want %v %q", i, got[i].level, got[i].msg, w.level, w.msg)
		}
		if got[i].attrs["source"] != "engine" || got[i].attrs["stream"] != "stdout" {
			t.Errorf("record %d lacks its source: %v", i, got[i].attrs)
		}
	}
	if got[0].attrs["in"] != "mvps_te::session_manager::session with image_id: demo.mvps-image" || got[0].attrs["at"] != "mvps-te/src/layered_store.rs:120" {
		t.Errorf("location or span lost: %v", got[0].attrs)
	}
	if got[2].attrs["target"] != "mvps_te" || got[2].attrs["at"] != "mvps-te/src/main.rs:167" {
		t.Errorf("colour escapes left in: %v", got[2].attrs)
	}
	if d := got[4].attrs["detail"]; d != "Caused by:\n    0: No such file or directory (os error 2)" {
		t.Errorf("the error's cause chain: %q", d)
	}
	if got[4].attrs["in"] != "mvps_te::session_manager::session_loop with image_id: demo.mvps-image; mvps_te::session_manager::session" {
		t.Errorf("spans: %q", got[4].attrs["in"])
	}
}

// A client that hangs up before its export name is the provisioner's own
// probe or spare: not an error worth an operator's night. A token the
// engine refuses still is.
func TestHandshakeEOFIsNoError(t *testing.T) {
	got := feed("stdout", `  2026-01-02T03:04:05.000001Z ERROR mvps_te: handshake failed, error: early eof, remote: "unix"
    at mvps-te/src/main.rs:336

  2026-01-02T03:04:05.000002Z ERROR mvps_te: handshake failed, error: InvalidSignature, remote: "unix"
    at mvps-te/src/main.rs:336
`)
	if len(got) != 2 {
		t.Fatalf("%d records: %+v", len(got), got)
	}
	if got[0].level != slog.LevelDebug || got[0].attrs["note"] == "" {
		t.Errorf("a client leaving during the handshake logged at %v: %+v", got[0].level, got[0])
	}
	if got[1].level != slog.LevelError {
		t.Errorf("a refused token logged at %v", got[1].level)
	}
}

// mvps-te logs the kernel's NBD_CMD_DISC, which ends every detach, as an
// error; any other command it refuses stays one.
func TestKernelDisconnectIsNoError(t *testing.T) {
	got := feed("stdout", `  2026-01-02T03:04:05.000001Z ERROR mvps_te::session_manager: async operation failed, remote: "unix", image_id: demo.mvps-image, error: unsupported request type: 2, op_name: "conn_loop"
    at mvps-te/src/session_manager.rs:696
    in mvps_te::session_manager::session with image_id: demo.mvps-image

  2026-01-02T03:04:05.000002Z ERROR mvps_te::session_manager: async operation failed, remote: "unix", image_id: demo.mvps-image, error: unsupported request type: 3, op_name: "conn_loop"
    at mvps-te/src/session_manager.rs:696
`)
	if len(got) != 2 {
		t.Fatalf("%d records: %+v", len(got), got)
	}
	if got[0].level != slog.LevelDebug || got[0].attrs["note"] == "" {
		t.Errorf("the kernel's disconnect logged at %v: %+v", got[0].level, got[0])
	}
	if got[1].level != slog.LevelError {
		t.Errorf("an unknown command (FLUSH) logged at %v", got[1].level)
	}
}

func TestOtherFormatsAtTheirLevels(t *testing.T) {
	for _, tc := range []struct {
		name, stream, line string
		level              slog.Level
		msg                string
	}{
		{"tracing full", "stdout", "2026-01-02T03:04:05.000001Z  WARN mvps_te: slow checkpoint", slog.LevelWarn, "engine: mvps_te: slow checkpoint"},
		{"tracing compact", "stdout", "2026-01-02T03:04:05.000001Z ERROR mvps_te: boom", slog.LevelError, "engine: mvps_te: boom"},
		{"tracing json", "stdout", `{"timestamp":"2026-01-02T03:04:05Z","level":"DEBUG","fields":{"message":"x"},"target":"mvps_te"}`, slog.LevelDebug,
			`engine: {"timestamp":"2026-01-02T03:04:05Z","level":"DEBUG","fields":{"message":"x"},"target":"mvps_te"}`},
		{"slog json", "stderr", `{"time":"2026-01-02T03:04:05Z","level":"WARN","msg":"w"}`, slog.LevelWarn, `engine: {"time":"2026-01-02T03:04:05Z","level":"WARN","msg":"w"}`},
		{"stand-in logfmt", "stderr", `time=2026-01-02T03:04:05.000Z level=INFO msg="mvps-te-dev listening" listen=unix:/x`, slog.LevelInfo,
			`engine: msg="mvps-te-dev listening" listen=unix:/x`},
		{"stand-in error", "stderr", `time=2026-01-02T03:04:05.000Z level=ERROR msg="fsync failed" image_id=a.mvps-image`, slog.LevelError,
			`engine: msg="fsync failed" image_id=a.mvps-image`},
		{"a panic on stderr", "stderr", "thread 'main' panicked at mvps-te/src/main.rs:12:5:", slog.LevelError, "engine: thread 'main' panicked at mvps-te/src/main.rs:12:5:"},
		{"plain stdout", "stdout", "hello", slog.LevelInfo, "engine: hello"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := feed(tc.stream, tc.line)
			if len(got) != 1 || got[0].level != tc.level || got[0].msg != tc.msg {
				t.Fatalf("logged %+v, want one record at %v: %q", got, tc.level, tc.msg)
			}
		})
	}
}

// A record the stream ends in the middle of is still logged, once.
func TestRecordCutShortByTheEnd(t *testing.T) {
	got := feed("stdout", "  2026-01-02T03:04:05.000001Z ERROR mvps_te: handover failed, error: x\n    at mvps-te/src/main.rs:350")
	if len(got) != 1 || got[0].level != slog.LevelError || got[0].msg != "engine: handover failed, error: x" {
		t.Fatalf("logged %+v", got)
	}
}
