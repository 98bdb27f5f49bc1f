package engine

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/nbd"
)

// ErrSessionRefused: the handshake went through but the engine closed the
// connection at once. mvps-te refuses a session only after sending the
// export info (bad image id, page size or size mismatch, store failure),
// so without this check the kernel would get a dead socket.
var ErrSessionRefused = errors.New("engine closed the session right after the handshake (image refused; see the engine log)")

// probeHandle marks the probe's read: "mvps-prb".
const probeHandle = 0x6d7670732d707262

// probeRequest is the probe: a read of the first block.
func probeRequest(handle uint64) []byte {
	return nbd.Request{Type: nbd.CmdRead, Handle: handle, Length: BlockSize}.Append(nil)
}

// ProbeSession reads the first block through conn before the kernel gets
// it, proving the engine serves the image.
func ProbeSession(ctx context.Context, conn net.Conn) error {
	if deadline, ok := ctx.Deadline(); ok {
		conn.SetDeadline(deadline)
		defer conn.SetDeadline(time.Time{})
	}
	if _, err := conn.Write(probeRequest(probeHandle)); err != nil {
		return fmt.Errorf("probe read: %w", err)
	}
	handle, err := readProbeReply(conn)
	if err == nil && handle != probeHandle {
		err = fmt.Errorf("probe read: reply for handle %#x", handle)
	}
	return err
}

// readProbeReply reads the answer to a probe, within whatever deadline
// its connection has, and returns its handle.
func readProbeReply(r io.Reader) (uint64, error) {
	var hdr [nbd.SimpleReplySize]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return 0, probeReadError(err)
	}
	reply, err := nbd.ParseSimpleReply(hdr[:])
	if err != nil {
		return 0, fmt.Errorf("probe read: %w", err)
	}
	if reply.Error != 0 {
		return 0, fmt.Errorf("probe read: %w", reply.Error)
	}
	if _, err := io.CopyN(io.Discard, r, BlockSize); err != nil {
		return 0, fmt.Errorf("probe read data: %w", err)
	}
	return reply.Handle, nil
}

// probeReadError says why a probe's answer did not come. A refusing engine
// closes the connection; with our request still unread in its socket,
// that arrives as a reset.
func probeReadError(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) {
		return ErrSessionRefused
	}
	return fmt.Errorf("probe read: %w", err)
}
