package devengine

import (
	"errors"
	"fmt"
	"io"
	"unicode/utf8"

	"github.com/mvps-provisioner/mvps-provisioner/nbd"
)

// greeting is mvps-te's: fixed newstyle with NO_ZEROES.
var greeting = nbd.Greeting{Flags: nbd.FlagFixedNewstyle | nbd.FlagNoZeroes}.Append(nil)

// wantClientFlags is the only answer to the greeting mvps-te accepts.
const wantClientFlags = nbd.ClientFlagFixedNewstyle | nbd.ClientFlagNoZeroes

// negotiate runs the handshake up to the export name, which it returns.
// Like mvps-te it drops the client (returns an error, sends nothing) for
// client flags other than FIXED_NEWSTYLE|NO_ZEROES, a missing IHAVEOPT, an
// option longer than 64 KiB or an export name that is not UTF-8. It ACKs
// NBD_OPT_ABORT and keeps reading (mvps-te does; the client then closes),
// and answers every other option with NBD_REP_ERR_UNSUP.
func negotiate(r io.Reader, w io.Writer) (string, error) {
	if _, err := w.Write(greeting); err != nil {
		return "", fmt.Errorf("send greeting: %w", err)
	}
	var buf [nbd.OptionHeaderSize]byte
	if _, err := io.ReadFull(r, buf[:nbd.ClientFlagsSize]); err != nil {
		return "", fmt.Errorf("read client flags: %w", err)
	}
	flags, err := nbd.ParseClientFlags(buf[:nbd.ClientFlagsSize])
	if err != nil {
		return "", err
	}
	if flags != wantClientFlags {
		return "", fmt.Errorf("client flags %#08x, want exactly FIXED_NEWSTYLE|NO_ZEROES (0x3)", uint32(flags))
	}
	for {
		if _, err := io.ReadFull(r, buf[:]); err != nil {
			return "", fmt.Errorf("read option: %w", err)
		}
		h, err := nbd.ParseOptionHeader(buf[:])
		if err != nil {
			return "", err
		}
		if h.Length > nbd.MaxOptionLength {
			return "", fmt.Errorf("%v data too long: %d bytes, at most %d", h.Option, h.Length, nbd.MaxOptionLength)
		}
		data := make([]byte, h.Length)
		if _, err := io.ReadFull(r, data); err != nil {
			return "", fmt.Errorf("read %v data: %w", h.Option, err)
		}
		reply := nbd.RepErrUnsup
		switch h.Option {
		case nbd.OptExportName:
			if !utf8.Valid(data) {
				return "", errors.New("export name is not valid UTF-8")
			}
			return string(data), nil
		case nbd.OptAbort:
			reply = nbd.RepAck
		}
		msg := nbd.OptionReplyHeader{Option: h.Option, Type: reply}.Append(buf[:0:0])
		if _, err := w.Write(msg); err != nil {
			return "", fmt.Errorf("reply to %v: %w", h.Option, err)
		}
	}
}

// sendExportInfo ends the handshake: the size from the token and
// HAS_FLAGS only, nothing else advertised, no padding (NO_ZEROES).
func sendExportInfo(w io.Writer, size uint64) error {
	_, err := w.Write(nbd.ExportInfo{Size: size, Flags: nbd.FlagHasFlags}.Append(nil))
	return err
}
