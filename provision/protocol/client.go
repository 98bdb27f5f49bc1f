package protocol

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"

	"golang.org/x/sys/unix"

	"github.com/mvps-provisioner/mvps-provisioner/internal/interrupt"
)

// Attachment is the caller's side of an attached image: it lasts as long
// as Conn is open.
type Attachment struct {
	// Conn is the connection to the provisioner; closing it detaches.
	Conn *net.UnixConn
	// Device is the block device in fd mode, nil in mount mode.
	Device *os.File
}

// Close releases the device and the connection, which makes the
// provisioner flush and detach the image.
func (a *Attachment) Close() error {
	var err error
	if a.Device != nil {
		err = a.Device.Close()
	}
	if cerr := a.Conn.Close(); err == nil {
		err = cerr
	}
	return err
}

// Wait blocks until the provisioner closes the connection (it is shutting
// down or gone) or ctx is done. The attachment stays as it was: Wait can
// be called again.
func (a *Attachment) Wait(ctx context.Context) error {
	// A later Wait would take a deadline left behind for the
	// provisioner's hang-up.
	defer interrupt.OnDone(ctx, a.Conn.SetReadDeadline)()
	buf := make([]byte, 64)
	for {
		n, err := a.Conn.Read(buf)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err != nil || n == 0 {
			return errors.New("provisioner closed the connection")
		}
	}
}

// Attach asks the provisioner at socketPath for the image named key in fd
// mode and returns the device.
func Attach(ctx context.Context, socketPath, key string) (*Attachment, error) {
	return request(ctx, socketPath, key, nil, true)
}

// AttachMount asks the provisioner to mount the image named key on dir, in
// the mount namespace mountNS (an open /proc/<pid>/ns/mnt).
func AttachMount(ctx context.Context, socketPath, key string, mountNS, dir *os.File) (*Attachment, error) {
	return request(ctx, socketPath, key, []int{int(mountNS.Fd()), int(dir.Fd())}, false)
}

// SendRaw sends an arbitrary message with fds and returns the reply payload
// and any fds received; for tests and diagnostics of the protocol itself.
func SendRaw(ctx context.Context, socketPath string, msg []byte, fds []int) (*net.UnixConn, []byte, []int, error) {
	if err := ctx.Err(); err != nil {
		return nil, nil, nil, fmt.Errorf("connect to provisioner: %w", err)
	}
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	conn, err := connectAndSend(socketPath, msg, oob)
	if err != nil {
		return nil, nil, nil, err
	}
	// The connection is the attachment's once the reply is in: no
	// deadline of the wait may outlive it.
	release := interrupt.OnDone(ctx, conn.SetDeadline)
	buf := make([]byte, maxReplySize+64)
	roob := make([]byte, unix.CmsgSpace(4*4))
	n, oobn, _, _, err := conn.ReadMsgUnix(buf, roob)
	release()
	got := parseFDs(roob[:oobn])
	if err != nil {
		CloseFDs(got)
		conn.Close()
		if ctx.Err() != nil {
			return nil, nil, nil, fmt.Errorf("wait for reply: %w", ctx.Err())
		}
		return nil, nil, nil, fmt.Errorf("read reply: %w", err)
	}
	return conn, buf[:n], got, nil
}

func request(ctx context.Context, socketPath, key string, fds []int, wantFD bool) (*Attachment, error) {
	conn, payload, got, err := SendRaw(ctx, socketPath, AppendRequest(nil, CommandAttach, key), fds)
	if err != nil {
		return nil, err
	}
	if len(payload) == 0 {
		CloseFDs(got)
		conn.Close()
		return nil, errors.New("provisioner closed the connection without a reply")
	}
	if err := ParseReply(payload); err != nil {
		CloseFDs(got)
		conn.Close()
		return nil, err
	}
	a := &Attachment{Conn: conn}
	switch {
	case wantFD && len(got) == 1:
		a.Device = os.NewFile(uintptr(got[0]), "nbd-device")
	case !wantFD && len(got) == 0:
	default:
		CloseFDs(got)
		conn.Close()
		return nil, fmt.Errorf("provisioner replied OK with %d fds", len(got))
	}
	return a, nil
}
