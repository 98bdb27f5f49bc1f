// Package protocol is the caller protocol of the mvps provisioner: the
// request and reply messages on its SEQPACKET socket, with both sides of
// the exchange (the server's reads and replies, the caller's Attach and
// AttachMount). Callers import this package alone, never the provisioner.
package protocol

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
)

// The request a caller sends, as one SEQPACKET message:
//
//	offset 0: magic, u32 little-endian, 0x6ae9a757
//	offset 4: command, u8 (CommandAttach = 0x01)
//	offset 5: key length N, u32 little-endian
//	offset 9: key, N bytes
//
// The message is exactly 9+N bytes long.
const (
	RequestMagic uint32 = 0x6ae9a757
	// CommandAttach attaches the image named by the key: with no fds the
	// reply carries the device fd; with a mount namespace and a directory
	// fd the image's file system is mounted there. (The seed protocol
	// calls it "mount" whatever the mode.)
	CommandAttach byte = 0x01

	requestHeaderSize = 9
	// MaxKeyLength is the longest image key: a DNS subdomain, like the name
	// of a ConfigMap key.
	MaxKeyLength = 253
	// MaxRequestSize is the longest valid request.
	MaxRequestSize = requestHeaderSize + MaxKeyLength
)

// Request is a decoded request.
type Request struct {
	Command byte
	Key     string
}

// AppendRequest appends the encoding of a request to b.
func AppendRequest(b []byte, command byte, key string) []byte {
	b = binary.LittleEndian.AppendUint32(b, RequestMagic)
	b = append(b, command)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(key)))
	return append(b, key...)
}

// Errors of a request, answered with CodeBadRequest and
// CodeUnknownCommand.
var (
	ErrBadRequest     = errors.New("bad request")
	ErrUnknownCommand = errors.New("unknown command")
)

// ParseRequest decodes msg, which must be exactly one request. Its errors
// wrap ErrBadRequest or ErrUnknownCommand.
func ParseRequest(msg []byte) (Request, error) {
	if len(msg) < requestHeaderSize {
		return Request{}, fmt.Errorf("%w: request is %d bytes, shorter than the 9-byte header", ErrBadRequest, len(msg))
	}
	if m := binary.LittleEndian.Uint32(msg); m != RequestMagic {
		return Request{}, fmt.Errorf("%w: bad magic %#08x, want %#08x", ErrBadRequest, m, RequestMagic)
	}
	n := binary.LittleEndian.Uint32(msg[5:])
	if uint64(len(msg)) != requestHeaderSize+uint64(n) {
		return Request{}, fmt.Errorf("%w: key length field says %d bytes but the request carries %d", ErrBadRequest, n, len(msg)-requestHeaderSize)
	}
	req := Request{Command: msg[4], Key: string(msg[requestHeaderSize:])}
	if req.Command != CommandAttach {
		return req, fmt.Errorf("%w: command %#02x is not known (attach is 0x01)", ErrUnknownCommand, req.Command)
	}
	if err := ValidateKey(req.Key); err != nil {
		return req, fmt.Errorf("%w: %v", ErrBadRequest, err)
	}
	return req, nil
}

// ValidateKey accepts 1 to 253 characters of [A-Za-z0-9._-] not starting
// with a dot. The key names a file in the image config directory, so this
// is what keeps "..", "/", NUL and hidden files like Kubernetes' "..data"
// out of the file system path.
func ValidateKey(key string) error {
	if key == "" {
		return errors.New("image key is empty")
	}
	if len(key) > MaxKeyLength {
		return fmt.Errorf("image key is %d bytes, at most %d", len(key), MaxKeyLength)
	}
	if key[0] == '.' {
		return errors.New("image key must not start with '.'")
	}
	for i := 0; i < len(key); i++ {
		c := key[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-') {
			return fmt.Errorf("image key has byte %q at %d; allowed are A-Z a-z 0-9 . _ -", c, i)
		}
	}
	return nil
}

// Reply codes, the second word of an ERR reply.
const (
	CodeBadRequest     = "bad_request"
	CodeUnknownCommand = "unknown_command"
	CodeNotFound       = "not_found"
	// CodeForbidden: the image config does not grant this caller the image,
	// or the mode, or the mount target it asked for.
	CodeForbidden         = "forbidden"
	CodeInvalidConfig     = "invalid_config"
	CodeBusy              = "busy"
	CodeEngineUnavailable = "engine_unavailable"
	CodeAttachFailed      = "attach_failed"
	CodeInternal          = "internal"
)

// Codes lists every reply code, for whoever counts replies by code and
// wants each count to exist before its first reply (the metrics).
var Codes = []string{
	CodeBadRequest, CodeUnknownCommand, CodeNotFound, CodeForbidden, CodeInvalidConfig,
	CodeBusy, CodeEngineUnavailable, CodeAttachFailed, CodeInternal,
}

// ReplyOK is the payload of a successful reply.
const ReplyOK = "OK"

// ReplyError is a failure the provisioner reports to the caller as
// "ERR <code> <message>". It is what the client side returns for one.
type ReplyError struct {
	Code    string
	Message string
}

func (e *ReplyError) Error() string { return "ERR " + e.Code + " " + e.Message }

// Payload is the reply message: one line, no newline, at most 512 bytes
// so that it always fits a caller's receive buffer.
func (e *ReplyError) Payload() []byte {
	msg := strings.ReplaceAll(e.Message, "\n", " ")
	p := "ERR " + e.Code + " " + msg
	if len(p) > maxReplySize {
		p = p[:maxReplySize]
	}
	return []byte(p)
}

const maxReplySize = 512

// ParseReply decodes a reply payload: nil for OK, a *ReplyError for ERR.
func ParseReply(payload []byte) error {
	s := string(payload)
	if s == ReplyOK {
		return nil
	}
	if rest, ok := strings.CutPrefix(s, "ERR "); ok {
		code, msg, _ := strings.Cut(rest, " ")
		return &ReplyError{Code: code, Message: msg}
	}
	return fmt.Errorf("provision: malformed reply %q", s)
}
