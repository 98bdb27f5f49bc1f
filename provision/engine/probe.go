package engine

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/nbd"
)

// ErrSessionRefused: the handshake went through but the engine closed the
// connection at once. mvps-te refuses a session only after sending the
// export info (bad image id, page size or size mismatch, store failure),
// so without this check the kernel would get a dead socket.
var ErrSessionRefused = errors.New("engine closed the session right after the handshake (image refused; see the engine log)")

// ProbeSession reads the first block through conn before the kernel gets
// it, proving the engine serves the image.
func ProbeSession(ctx context.Context, conn net.Conn) error {
	if deadline, ok := ctx.Deadline(); ok {
		conn.SetDeadline(deadline)
		defer conn.SetDeadline(time.Time{})
	}
	const handle = 0x6d7670732d707262 // "mvps-prb"
	req := nbd.Request{Type: nbd.CmdRead, Handle: handle, Length: BlockSize}.Append(nil)
	if _, err := conn.Write(req); err != nil {
		return fmt.Errorf("probe read: %w", err)
	}
	var hdr [nbd.SimpleReplySize]byte
	if _, err := io.ReadFull(conn, hdr[:]); err != nil {
		if errors.Is(err, io.EOF) {
			return ErrSessionRefused
		}
		return fmt.Errorf("probe read: %w", err)
	}
	reply, err := nbd.ParseSimpleReply(hdr[:])
	if err != nil {
		return fmt.Errorf("probe read: %w", err)
	}
	if reply.Handle != handle {
		return fmt.Errorf("probe read: reply for handle %#x", reply.Handle)
	}
	if reply.Error != 0 {
		return fmt.Errorf("probe read: %w", reply.Error)
	}
	if _, err := io.CopyN(io.Discard, conn, BlockSize); err != nil {
		return fmt.Errorf("probe read data: %w", err)
	}
	return nil
}
