// Package handshake is the client side of the NBD fixed-newstyle negotiation
// in mvps-te's dialect: the client sends FIXED_NEWSTYLE|NO_ZEROES and a single
// NBD_OPT_EXPORT_NAME carrying the signed token, and gets back the export's
// size and transmission flags. After Negotiate returns, the connection is in
// the transmission phase and can be handed to the kernel.
//
// mvps-te answers NBD_OPT_GO and every other modern option with ERR_UNSUP, so
// this client never sends them.
package handshake

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/internal/interrupt"
	"github.com/mvps-provisioner/mvps-provisioner/nbd"
)

// Export is what the server said about the export.
type Export struct {
	Size  uint64
	Flags nbd.TransmissionFlags
}

// ClientFlags are the flags this client sends: exactly the two mvps-te
// demands, since it drops a client that sends any other.
const ClientFlags = nbd.ClientFlagFixedNewstyle | nbd.ClientFlagNoZeroes

// Negotiate runs the handshake on conn with exportName (for mvps-te: the
// signed JWT). It honours ctx's deadline and cancellation as well as any
// deadline already set on conn, and clears the deadline it set before
// returning. On error the caller should close conn.
func Negotiate(ctx context.Context, conn net.Conn, exportName string) (Export, error) {
	return NegotiateAndSend(ctx, conn, exportName, nil)
}

// NegotiateAndSend is Negotiate that also sends first, in the same write as
// the export name, the first bytes of the transmission phase (a request):
// the server finds them as soon as the handshake is done, without waiting
// a round trip for them. The caller reads their answer after Negotiate
// returns.
//
// mvps-te reads the handshake through the buffer its transmission phase
// goes on reading, so a request sent this way is served. A server that
// read the handshake through a buffer of its own and then dropped it would
// never see the request; a caller should be ready to notice that (no
// answer) and to fall back to Negotiate.
func NegotiateAndSend(ctx context.Context, conn net.Conn, exportName string, first []byte) (Export, error) {
	if err := ctx.Err(); err != nil {
		return Export{}, &Error{Step: "greeting", Err: err}
	}
	touched := false
	if deadline, ok := ctx.Deadline(); ok {
		if err := conn.SetDeadline(deadline); err != nil {
			return Export{}, &Error{Step: "greeting", Err: fmt.Errorf("set deadline: %w", err)}
		}
		touched = true
	}
	// Cancellation must unblock a read that is already waiting.
	release := interrupt.OnDone(ctx, conn.SetDeadline)
	export, err := negotiate(conn, exportName, first)
	if !release() && touched {
		conn.SetDeadline(time.Time{})
	}
	if err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
		// Report the context's reason rather than a bare I/O timeout. The
		// socket deadline can fire a moment before the context's own timer.
		reason := ctx.Err()
		if deadline, ok := ctx.Deadline(); reason == nil && ok && !time.Now().Before(deadline) {
			reason = context.DeadlineExceeded
		}
		var herr *Error
		if reason != nil && errors.As(err, &herr) {
			herr.Err = fmt.Errorf("%w: %w", reason, herr.Err)
		}
	}
	return export, err
}

// negotiate is the protocol without deadlines, so that it can be fuzzed
// over any byte stream.
func negotiate(rw io.ReadWriter, exportName string, first []byte) (Export, error) {
	if len(exportName) > nbd.MaxOptionLength {
		return Export{}, &Error{Step: "export name", Err: fmt.Errorf("%w: %d bytes, at most %d",
			ErrExportNameTooLong, len(exportName), nbd.MaxOptionLength)}
	}

	var buf [nbd.GreetingSize]byte
	if err := readMessage(rw, buf[:nbd.GreetingSize], ErrClosed); err != nil {
		return Export{}, &Error{Step: "greeting", Err: err}
	}
	greeting, err := nbd.ParseGreeting(buf[:])
	if err != nil {
		return Export{}, &Error{Step: "greeting", Err: err}
	}
	const need = nbd.FlagFixedNewstyle | nbd.FlagNoZeroes
	if greeting.Flags&need != need {
		return Export{}, &Error{Step: "greeting", Err: fmt.Errorf(
			"%w: server handshake flags %#04x lack FIXED_NEWSTYLE|NO_ZEROES", ErrUnexpectedFlags, uint16(greeting.Flags))}
	}

	// Flags and option go out in one write: the server reads them in order
	// and a single segment halves the round trips on a fresh connection.
	msg := make([]byte, 0, nbd.ClientFlagsSize+nbd.OptionHeaderSize+len(exportName)+len(first))
	msg = nbd.AppendClientFlags(msg, ClientFlags)
	msg = nbd.OptionHeader{Option: nbd.OptExportName, Length: uint32(len(exportName))}.Append(msg)
	msg = append(msg, exportName...)
	msg = append(msg, first...)
	if _, err := rw.Write(msg); err != nil {
		return Export{}, &Error{Step: "export name", Err: classifyWriteError(err)}
	}

	if err := readMessage(rw, buf[:nbd.ExportInfoSize], ErrTokenRefused); err != nil {
		return Export{}, &Error{Step: "export info", Err: err}
	}
	info, err := nbd.ParseExportInfo(buf[:nbd.ExportInfoSize])
	if err != nil {
		return Export{}, &Error{Step: "export info", Err: err}
	}
	if info.Flags&nbd.FlagHasFlags == 0 {
		return Export{}, &Error{Step: "export info", Err: fmt.Errorf(
			"%w: transmission flags %s lack HAS_FLAGS", ErrUnexpectedFlags, info.Flags)}
	}
	return Export{Size: info.Size, Flags: info.Flags}, nil
}

// readMessage fills b, telling a connection that ended cleanly before the
// message (closed) from one that ended inside it (truncated).
func readMessage(r io.Reader, b []byte, closed error) error {
	n, err := io.ReadFull(r, b)
	switch {
	case err == nil:
		return nil
	case n == 0 && (errors.Is(err, io.EOF) || isReset(err)):
		return closed
	case errors.Is(err, io.ErrUnexpectedEOF) || isReset(err):
		return fmt.Errorf("%w: got %d of %d bytes", ErrTruncated, n, len(b))
	default:
		return err
	}
}

func classifyWriteError(err error) error {
	if isReset(err) {
		return fmt.Errorf("%w: %v", ErrClosed, err)
	}
	return err
}

// isReset: a server that closes with our unread bytes in its buffer makes
// the kernel send a reset instead of a clean end of stream.
func isReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) || errors.Is(err, io.ErrClosedPipe)
}
