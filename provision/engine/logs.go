package engine

import (
	"context"
	"encoding/json"
	"log/slog"
	"regexp"
	"strings"
)

// The engine's output, turned into records of the provisioner's log, each
// logged once at the engine's own level.
//
// mvps-te logs through Rust's tracing in its "pretty" format, hard-wired
// (no setting chooses another), one record over several lines:
//
//	  2026-01-02T03:04:05.678901Z ERROR mvps_te: handshake failed, error: early eof, remote: ...
//	    at mvps-te/src/main.rs:336
//	    in mvps_te::session with image_id: a.mvps-image
//	<empty line>
//
// A field may span lines of its own (an error's "Caused by:" chain) before
// the "at" line. The engine is started with NO_COLOR=1, which
// tracing-subscriber (0.3.18 on, in every mvps-te release) honours: no ANSI
// colours in the pipe; escapes are stripped anyway, for an engine built
// otherwise. Besides that format, lines of tracing's one-line formats, JSON
// lines with a "level" (tracing's JSON, Go's slog) and logfmt lines with
// level= (the stand-in mvps-te-dev) are read for their level. Anything else
// is a line of its own: on stdout at info, on stderr (where mvps-te writes
// only a panic or its fatal error) at error.

var (
	ansiEscape = regexp.MustCompile("\x1b\\[[0-9;?]*[A-Za-z]")
	// prettyHeader: two spaces, the timestamp, the level, the target.
	prettyHeader = regexp.MustCompile(`^  \d{4}-\d\d-\d\dT\S+ +(TRACE|DEBUG|INFO|WARN|ERROR) +(\S+?): (.*)$`)
	// oneLine: tracing's full and compact formats.
	oneLine  = regexp.MustCompile(`^\d{4}-\d\d-\d\dT\S+ +(TRACE|DEBUG|INFO|WARN|ERROR) +(.*)$`)
	logfmt   = regexp.MustCompile(`(?:^|\s)level=(TRACE|DEBUG|INFO|WARN|WARNING|ERROR)(?:[+-]\d+)?(?:\s|$)`)
	logfmtTS = regexp.MustCompile(`^time=\S+ `)
)

// engineLevel is the slog level of one of the engine's level names.
func engineLevel(name string) slog.Level {
	switch strings.ToUpper(name) {
	case "TRACE", "DEBUG":
		return slog.LevelDebug
	case "WARN", "WARNING":
		return slog.LevelWarn
	case "ERROR":
		return slog.LevelError
	}
	return slog.LevelInfo
}

// logRecord is one record of the engine's, being read.
type logRecord struct {
	level  slog.Level
	target string
	msg    string
	more   []string // lines of its fields after the first
	at     string
	spans  []string
}

// logReader reads one of the engine's streams, line by line.
type logReader struct {
	log      *slog.Logger
	stream   string
	fallback slog.Level // of a line in no format known
	pending  *logRecord // a pretty record not ended yet
	located  bool       // pending has had its "at" line
}

func newLogReader(log *slog.Logger, stream string) *logReader {
	fallback := slog.LevelInfo
	if stream == "stderr" {
		fallback = slog.LevelError
	}
	return &logReader{log: log, stream: stream, fallback: fallback}
}

// line takes the next line of the stream (without its newline).
func (r *logReader) line(raw string) {
	line := strings.TrimRight(ansiEscape.ReplaceAllString(raw, ""), "\r")
	if m := prettyHeader.FindStringSubmatch(line); m != nil {
		r.flush()
		r.pending = &logRecord{level: engineLevel(m[1]), target: m[2], msg: m[3]}
		return
	}
	if r.pending != nil {
		switch {
		case !r.located && strings.HasPrefix(line, "    at "):
			r.pending.at = strings.TrimPrefix(line, "    at ")
			r.located = true
			return
		case r.located && strings.HasPrefix(line, "    in "):
			r.pending.spans = append(r.pending.spans, strings.TrimPrefix(line, "    in "))
			return
		case r.located && line == "":
			r.flush()
			return
		case !r.located:
			r.pending.more = append(r.pending.more, line)
			return
		}
		// Not part of a pretty record after its location: the record
		// is over, and this line stands on its own.
		r.flush()
	}
	if line == "" {
		return
	}
	r.single(line)
}

// single logs a line that is a record by itself.
func (r *logReader) single(line string) {
	if m := oneLine.FindStringSubmatch(line); m != nil {
		r.emit(&logRecord{level: engineLevel(m[1]), msg: m[2]})
		return
	}
	if strings.HasPrefix(line, "{") {
		var obj struct {
			Level string `json:"level"`
		}
		if json.Unmarshal([]byte(line), &obj) == nil && obj.Level != "" {
			r.emit(&logRecord{level: engineLevel(strings.TrimRight(obj.Level, "+-0123456789")), msg: line})
			return
		}
	}
	if m := logfmt.FindStringSubmatchIndex(line); m != nil {
		// The level goes into the record's level, and the time is the
		// provisioner's own: neither is repeated in the message.
		msg := strings.TrimSpace(line[:m[0]] + " " + line[m[1]:])
		r.emit(&logRecord{level: engineLevel(line[m[2]:m[3]]), msg: logfmtTS.ReplaceAllString(msg, "")})
		return
	}
	r.emit(&logRecord{level: r.fallback, msg: line})
}

// flush logs the pending record, if any.
func (r *logReader) flush() {
	if r.pending != nil {
		r.emit(r.pending)
	}
	r.pending, r.located = nil, false
}

// end is called when the stream has ended.
func (r *logReader) end() { r.flush() }

func (r *logReader) emit(rec *logRecord) {
	level := rec.level
	attrs := []slog.Attr{slog.String("source", "engine"), slog.String("stream", r.stream)}
	if rec.target != "" {
		attrs = append(attrs, slog.String("target", rec.target))
	}
	if len(rec.more) > 0 {
		attrs = append(attrs, slog.String("detail", strings.Trim(strings.Join(rec.more, "\n"), "\n")))
	}
	if rec.at != "" {
		attrs = append(attrs, slog.String("at", rec.at))
	}
	if len(rec.spans) > 0 {
		attrs = append(attrs, slog.String("in", strings.Join(rec.spans, "; ")))
	}
	if level == slog.LevelError && clientLeftDuringHandshake(rec) {
		// The provisioner's own probes (readiness, metrics) read the
		// greeting and hang up, and so does a spare connection that
		// expires unused: mvps-te logs each as an error. Kept at error
		// they would bury the engine's real errors.
		level = slog.LevelDebug
		attrs = append(attrs, slog.String("note", "logged by mvps-te as an error; a client that leaves during the handshake is the provisioner's probe or an unused spare connection"))
	}
	if level == slog.LevelError && kernelDisconnected(rec) {
		// Every detach ends with the kernel's NBD_CMD_DISC, which
		// mvps-te serves no more than any command it does not know: it
		// logs an error and drops the connection, as the kernel wants.
		level = slog.LevelDebug
		attrs = append(attrs, slog.String("note", "logged by mvps-te as an error; NBD_CMD_DISC is how the kernel ends a device's connection at every detach"))
	}
	r.log.LogAttrs(context.Background(), level, "engine: "+rec.msg, attrs...)
}

// kernelDisconnected tells mvps-te's record of a connection's request loop
// ended by NBD_CMD_DISC (2), which it does not serve (session_manager.rs,
// every release): "async operation failed, ..., error: unsupported request
// type: 2, op_name: \"conn_loop\"".
func kernelDisconnected(rec *logRecord) bool {
	return strings.HasPrefix(rec.msg, "async operation failed") &&
		strings.Contains(rec.msg, "unsupported request type: 2,") && strings.Contains(rec.msg, `op_name: "conn_loop"`)
}

// clientLeftDuringHandshake tells mvps-te's record of a client that hung
// up before it sent its export name.
func clientLeftDuringHandshake(rec *logRecord) bool {
	if !strings.HasPrefix(rec.msg, "handshake failed") {
		return false
	}
	text := rec.msg + "\n" + strings.Join(rec.more, "\n")
	return strings.Contains(text, "early eof") || strings.Contains(text, "UnexpectedEof")
}
