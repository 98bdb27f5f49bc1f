//go:build linux

package netlinknbd

import (
	"cmp"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"syscall"

	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

type client struct {
	// mu spans a whole request/ack exchange: genetlink.Conn only locks
	// Send and Receive separately, and interleaved exchanges would steal
	// each other's replies.
	mu     sync.Mutex
	c      *genetlink.Conn
	family genetlink.Family
}

func newClient() (*client, error) {
	conn, err := genetlink.Dial(nil)
	if err != nil {
		return nil, fmt.Errorf("netlinknbd: dial: %w", err)
	}
	// Best effort: extended acks carry the kernel's reason for attribute
	// policy failures, which would otherwise be a bare EINVAL.
	_ = conn.SetOption(netlink.ExtendedAcknowledge, true)

	c, err := initClient(conn)
	if err != nil {
		_ = conn.Close()
		return nil, err
	}
	return c, nil
}

// initClient is separate from newClient so tests can supply a fake conn.
func initClient(conn *genetlink.Conn) (*client, error) {
	f, err := getFamily(conn)
	if err != nil {
		return nil, err
	}
	return &client{c: conn, family: f}, nil
}

func getFamily(conn *genetlink.Conn) (genetlink.Family, error) {
	f, err := conn.GetFamily(familyName)
	if errors.Is(err, os.ErrNotExist) {
		return f, fmt.Errorf("netlinknbd: generic netlink family %q not found (is the nbd module loaded?): %w", familyName, err)
	}
	if err != nil {
		return f, fmt.Errorf("netlinknbd: looking up family %q: %w", familyName, err)
	}
	return f, nil
}

func (c *client) Close() error {
	return c.c.Close()
}

// execute sends one command and collects the replies up to the kernel's
// acknowledgement. genetlink.Conn.Execute cannot be used: it stops after the
// first datagram, but CONNECT and STATUS answer with a reply datagram and
// then an ack datagram, and the ack left behind would be taken as the
// answer to the next request. Asking for the ack at all is what keeps a
// CONNECT whose reply the kernel failed to allocate from blocking forever.
func (c *client) execute(cmd uint8, attrs []byte) ([]genetlink.Message, error) {
	c.mu.Lock()
	defer c.mu.Unlock()

	req, err := c.c.Send(genetlink.Message{
		Header: genetlink.Header{Command: cmd, Version: familyVersion},
		Data:   attrs,
	}, c.family.ID, netlink.Request|netlink.Acknowledge)
	if err != nil {
		return nil, err
	}

	var replies []genetlink.Message
	for {
		gmsgs, nmsgs, err := c.c.Receive()
		if err != nil {
			// An error for an earlier, abandoned request is not ours.
			var oe *netlink.OpError
			if errors.As(err, &oe) && oe.Sequence != 0 && oe.Sequence != req.Header.Sequence {
				continue
			}
			return nil, err
		}
		for i, nm := range nmsgs {
			if nm.Header.Sequence != req.Header.Sequence {
				continue
			}
			// netlink.Conn turns error messages with a non-zero code
			// into errors, so an Error message here is the ack.
			if nm.Header.Type == netlink.Error {
				return replies, nil
			}
			replies = append(replies, gmsgs[i])
		}
	}
}

// withFDs calls fn with the descriptors of socks, each held open through
// RawConn.Control until fn returns, so that a concurrent Close cannot make
// the kernel pick up whatever file reuses the number.
func withFDs(socks []syscall.Conn, fn func(fds []int) error) error {
	fds := make([]int, 0, len(socks))
	var hold func(i int) error
	hold = func(i int) error {
		if i == len(socks) {
			return fn(fds)
		}
		rc, err := socks[i].SyscallConn()
		if err != nil {
			return fmt.Errorf("socket %d: %w: %w", i, err, ErrInvalid)
		}
		var ferr error
		err = rc.Control(func(fd uintptr) {
			fds = append(fds, int(fd))
			ferr = hold(i + 1)
		})
		if err != nil {
			return fmt.Errorf("socket %d: %w: %w", i, err, ErrInvalid)
		}
		return ferr
	}
	return hold(0)
}

func (c *client) Connect(cfg *ConnectConfig) (uint32, error) {
	var index uint32
	err := withFDs(cfg.Sockets, func(fds []int) error {
		b, err := encodeConnect(cfg, fds)
		if err != nil {
			return err
		}
		msgs, err := c.execute(cmdConnect, b)
		if err != nil {
			return classify(err)
		}
		index, err = decodeIndex(msgs, cmdConnect)
		if err != nil {
			return fmt.Errorf("device may be connected, but: %w", err)
		}
		return nil
	})
	return index, err
}

func (c *client) Disconnect(index uint32) error {
	b, err := encodeIndex(index)
	if err != nil {
		return err
	}
	if _, err := c.execute(cmdDisconnect, b); err != nil {
		return c.explainInvalid(err, index, false)
	}
	return nil
}

func (c *client) Reconfigure(index uint32, cfg *ReconfigureConfig) error {
	return withFDs(cfg.Sockets, func(fds []int) error {
		b, err := encodeReconfigure(index, cfg, fds)
		if err != nil {
			return err
		}
		if _, err := c.execute(cmdReconfigure, b); err != nil {
			return c.explainInvalid(err, index, true)
		}
		return nil
	})
}

// explainInvalid tells apart some of the causes the kernel folds into
// EINVAL for commands addressing one device, by asking for its status.
func (c *client) explainInvalid(err error, index uint32, needConnected bool) error {
	if !errors.Is(err, unix.EINVAL) {
		return classify(err)
	}
	st, serr := c.Status(index)
	switch {
	case errors.Is(serr, os.ErrNotExist):
		return &kernelError{err: err, detail: "no such device", is: []error{ErrInvalid, os.ErrNotExist}}
	case serr == nil && needConnected && !st.Connected:
		return &kernelError{err: err, detail: "device not connected", is: []error{ErrInvalid, ErrNotConnected}}
	}
	return classify(err)
}

// errNoDevice is what STATUS amounts to for an unknown index: the kernel
// answers with an empty device list rather than an error.
var errNoDevice = fmt.Errorf("no such device: %w", os.ErrNotExist)

func (c *client) Status(index uint32) (DeviceStatus, error) {
	b, err := encodeIndex(index)
	if err != nil {
		return DeviceStatus{}, err
	}
	msgs, err := c.execute(cmdStatus, b)
	if err != nil {
		return DeviceStatus{}, classify(err)
	}
	devs, err := decodeStatus(msgs)
	if err != nil {
		return DeviceStatus{}, err
	}
	// Matching on the index matters: the kernel reads the attribute as a
	// signed int, so index 0xffffffff (-1) returns every device.
	for _, d := range devs {
		if d.Index == index {
			return d, nil
		}
	}
	return DeviceStatus{}, errNoDevice
}

func (c *client) StatusAll() ([]DeviceStatus, error) {
	msgs, err := c.execute(cmdStatus, nil)
	if err != nil {
		return nil, classify(err)
	}
	devs, err := decodeStatus(msgs)
	if err != nil {
		return nil, err
	}
	// The kernel walks its IDR, which is ordered today, but that is not a
	// promise of the interface.
	slices.SortFunc(devs, func(a, b DeviceStatus) int {
		return cmp.Compare(a.Index, b.Index)
	})
	return devs, nil
}
