package nbddev

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/mvps-provisioner/mvps-provisioner/handshake"
	"github.com/mvps-provisioner/mvps-provisioner/netlinknbd"
)

// Devices attaches engine connections as kernel NBD devices through the
// nbd generic-netlink family.
type Devices struct {
	Netlink *netlinknbd.Client
	// RequestTimeout is the kernel's per-request timeout: an engine that
	// does not answer a request within it is treated as dead.
	RequestTimeout time.Duration
	// DeadConnTimeout is how long I/O waits for a new connection after
	// the engine connection died, before failing.
	DeadConnTimeout time.Duration
	// BlockSize is the devices' logical block size: the engine's page,
	// since a smaller write costs the engine a read-modify-write.
	BlockSize uint64
}

// Defaults for NBDDevices.
const (
	// DefaultKernelRequestTimeout is short because it is also how long a
	// request that was in flight when its connection died waits before the
	// kernel sends it again on the new one: the kernel retries, never
	// fails, a timed-out request while a connection lives or may return.
	DefaultKernelRequestTimeout = 10 * time.Second
	DefaultDeadConnTimeout      = 30 * time.Second
	// maxSectorsKB keeps every kernel request within what every release of
	// mvps-te serves: 1 MiB up to 0.1.3, 8 MiB from 0.1.4 on. A larger one
	// makes the engine drop the connection, and the kernel's own limit is
	// above 1 MiB (1280 KiB on 6.1, 4 MiB on later kernels). The engine
	// serves a request page by page anyway, so a larger one saves it
	// little more than a header.
	maxSectorsKB = 1024
)

// New opens the netlink client, for devices of blockSize bytes a block.
func New(blockSize uint64) (*Devices, error) {
	c, err := netlinknbd.New()
	if err != nil {
		return nil, fmt.Errorf("open nbd netlink family: %w", err)
	}
	return &Devices{
		Netlink:         c,
		RequestTimeout:  DefaultKernelRequestTimeout,
		DeadConnTimeout: DefaultDeadConnTimeout,
		BlockSize:       blockSize,
	}, nil
}

// Close closes the netlink client.
func (d *Devices) Close() error { return d.Netlink.Close() }

// Attach hands conn, which has completed the handshake, to the kernel, and
// returns the device opened read-write. It takes ownership of conn whatever
// it returns.
func (d *Devices) Attach(ctx context.Context, conn net.Conn, export handshake.Export, backend string) (*Device, error) {
	sc, ok := conn.(syscall.Conn)
	if !ok {
		conn.Close()
		return nil, fmt.Errorf("engine connection %T has no file descriptor", conn)
	}
	index, err := d.Netlink.Connect(netlinknbd.ConnectConfig{
		Sockets:           []syscall.Conn{sc},
		Size:              export.Size,
		BlockSize:         d.BlockSize,
		ServerFlags:       uint64(export.Flags),
		Timeout:           d.RequestTimeout,
		DeadConnTimeout:   d.DeadConnTimeout,
		BackendIdentifier: backend,
	})
	// The kernel holds its own reference to the socket now.
	conn.Close()
	if err != nil {
		return nil, fmt.Errorf("kernel connect: %w", err)
	}
	connected(ctx, index)
	dev := &Device{Index: index, Path: fmt.Sprintf("/dev/nbd%d", index)}
	if err := d.prepare(ctx, dev, export.Size); err != nil {
		d.disconnect(dev)
		return nil, err
	}
	return dev, nil
}

// prepare opens the device once it shows the export's size, and caps its
// request size.
//
// The kernel (5.11 and later) sets the size before it answers the connect,
// and devtmpfs has made the node by then, so the first open nearly always
// finds the device ready: polling sysfs first would only add its reads to
// every attach. The cap is checked on the open device, before anyone else
// has it: the only I/O before is a partition scan's few small reads.
func (d *Devices) prepare(ctx context.Context, dev *Device, size uint64) error {
	var last error
	err := poll(ctx, func() (bool, error) {
		// Opened without os.OpenFile, whose try to register the fd with
		// the poller (refused for a block device) and whose Fd (setting
		// it blocking again) cost four system calls on every attach.
		fd, err := unix.Open(dev.Path, unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			err = &fs.PathError{Op: "open", Path: dev.Path, Err: err}
			if !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, unix.ENXIO) {
				return false, err
			}
			last = err
			return false, nil
		}
		got, err := unix.IoctlGetUint64(fd, unix.BLKGETSIZE64)
		if err != nil || got != size {
			unix.Close(fd)
			last = fmt.Errorf("%s reports size %d (%v), want %d", dev.Path, got, err, size)
			return false, nil
		}
		dev.File = os.NewFile(uintptr(fd), dev.Path)
		return true, nil
	})
	if err != nil {
		if last != nil {
			err = fmt.Errorf("%w (last: %v)", err, last)
		}
		return fmt.Errorf("%s did not become ready: %w", dev.Path, err)
	}
	if err := capMaxSectors(dev); err != nil {
		dev.File.Close()
		dev.File = nil
		return err
	}
	return nil
}

// MaxPart is the nbd module's max_part: above 0, the kernel scans a
// device for partitions when it is first opened after a connect. -1 when it
// cannot be read.
func MaxPart() int {
	v, err := readTrimmed("/sys/module/nbd/parameters/max_part")
	if err != nil {
		return -1
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		return -1
	}
	return n
}

// capMaxSectors keeps dev's requests within the engine's limit: one ioctl
// on the open device, and a sysfs write only when the device's limit is
// above it. The kernel keeps a device's limit across its disconnects, so
// the write is made once per device, on its first attach.
func capMaxSectors(dev *Device) error {
	var sectors uint16 // BLKSECTGET answers an unsigned short, saturated
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, dev.File.Fd(), unix.BLKSECTGET, uintptr(unsafe.Pointer(&sectors))); errno != 0 {
		return fmt.Errorf("%s: read max sectors: %w", dev.Path, errno)
	}
	if int(sectors)/2 <= maxSectorsKB {
		return nil
	}
	path := fmt.Sprintf("/sys/block/nbd%d/queue/max_sectors_kb", dev.Index)
	if err := os.WriteFile(path, []byte(strconv.Itoa(maxSectorsKB)), 0); err != nil {
		return fmt.Errorf("cap %s at %d: %w", path, maxSectorsKB, err)
	}
	return nil
}

// Flush writes everything written to the device so far to the engine: fsync on a block device writes its dirty page
// cache, which holds what every opener wrote, to the engine.
func (d *Devices) Flush(ctx context.Context, dev *Device) error {
	done := make(chan error, 1)
	go func() { done <- dev.File.Sync() }()
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("flush %s: %w", dev.Path, err)
		}
		return nil
	case <-ctx.Done():
		// The disconnect that follows fails the writes still queued, which
		// ends the fsync.
		return fmt.Errorf("flush %s: %w", dev.Path, ctx.Err())
	}
}

// Detach disconnects the device and closes dev.File. Call it exactly once
// per attached device.
func (d *Devices) Detach(ctx context.Context, dev *Device) error {
	err := d.disconnect(dev)
	if dev.File != nil {
		dev.File.Close()
	}
	if err != nil {
		return err
	}
	// The device is free once its last opener is gone; a caller that still
	// holds its fd keeps it busy (with I/O failing) until it closes it.
	err = poll(ctx, func() (bool, error) {
		st, err := d.Netlink.Status(dev.Index)
		if err != nil {
			return false, err
		}
		return !st.Connected, nil
	})
	if err != nil {
		return fmt.Errorf("%s: %w (%v)", dev.Path, ErrStillOpen, err)
	}
	return nil
}

// Busy reports whether the kernel still holds a detached device, as it
// does while some process has it open.
func (d *Devices) Busy(dev *Device) (bool, error) {
	st, err := d.Netlink.Status(dev.Index)
	if err != nil {
		return false, fmt.Errorf("status of %s: %w", dev.Path, err)
	}
	return st.Connected, nil
}

func (d *Devices) disconnect(dev *Device) error {
	err := d.Netlink.Disconnect(dev.Index)
	if err != nil && !errors.Is(err, netlinknbd.ErrNotConnected) {
		return fmt.Errorf("disconnect %s: %w", dev.Path, err)
	}
	return nil
}

func readTrimmed(path string) (string, error) {
	b, err := os.ReadFile(path)
	return strings.TrimSpace(string(b)), err
}

// poll calls cond until it reports true, fails, or ctx ends. The kernel
// offers no event for "size visible" or "last opener gone", so polling is
// the readiness check: first at once, then after pollFirst, doubling up to
// pollMax. A detach is usually done within a millisecond or two, and the
// next attach of the image waits for it, so a fixed 5 ms tick cost most
// detaches a whole tick; the backoff keeps a long wait (a caller that holds
// its fd) as cheap as before.
func poll(ctx context.Context, cond func() (bool, error)) error {
	wait := pollFirst
	t := time.NewTimer(wait)
	defer t.Stop()
	for {
		ok, err := cond()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
		wait = min(2*wait, pollMax)
		t.Reset(wait)
	}
}

// The poll interval starts at pollFirst and doubles up to pollMax.
const (
	pollFirst = 250 * time.Microsecond
	pollMax   = 5 * time.Millisecond
)
