package nbddev

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/mvps-provisioner/mvps-provisioner/netlinknbd"
)

// Reconnect gives dev a new engine connection in place of its dead one.
// I/O that waited for the dead connection (up to the dead-connection
// timeout) goes on through the new one. It takes ownership of conn.
func (d *Devices) Reconnect(ctx context.Context, dev *Device, conn net.Conn, backend string) error {
	defer conn.Close() // the kernel holds its own reference once it has it
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return fmt.Errorf("engine connection %T has no file descriptor", conn)
	}
	err := d.Netlink.Reconfigure(dev.Index, netlinknbd.ReconfigureConfig{
		Sockets:           []syscall.Conn{sc},
		BackendIdentifier: backend,
	})
	if err != nil {
		return fmt.Errorf("reconnect %s: %w", dev.Path, err)
	}
	return nil
}

// Adopt takes over a device that an earlier run attached: it must be
// connected, with backend as its backend identifier and size bytes. The
// returned device is opened read-write like a fresh one.
func (d *Devices) Adopt(index uint32, backend string, size uint64) (*Device, error) {
	dev := &Device{Index: index, Path: fmt.Sprintf("/dev/nbd%d", index)}
	st, err := d.Netlink.Status(index)
	if err != nil {
		return nil, fmt.Errorf("adopt %s: %w", dev.Path, err)
	}
	got, _ := readTrimmed(fmt.Sprintf("/sys/block/nbd%d/backend", index))
	if !st.Connected || got != backend {
		return nil, fmt.Errorf("adopt %s (connected %v, backend %q, want %q): %w", dev.Path, st.Connected, got, backend, ErrNotOurs)
	}
	f, err := os.OpenFile(dev.Path, os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("adopt %s: %w", dev.Path, err)
	}
	n, err := unix.IoctlGetUint64(int(f.Fd()), unix.BLKGETSIZE64)
	if err != nil || n != size {
		f.Close()
		return nil, fmt.Errorf("adopt %s: size %d (%v), want %d: %w", dev.Path, n, err, size, ErrNotOurs)
	}
	dev.File = f
	return dev, nil
}

// SetTimeouts gives a device taken over this run's timeouts, which an
// earlier run may have set otherwise: an operator who changed them
// restarted to have them.
func (d *Devices) SetTimeouts(dev *Device, backend string) error {
	err := d.Netlink.Reconfigure(dev.Index, netlinknbd.ReconfigureConfig{
		Timeout:           &d.RequestTimeout,
		DeadConnTimeout:   &d.DeadConnTimeout,
		BackendIdentifier: backend,
	})
	if err != nil {
		return fmt.Errorf("set the timeouts of %s: %w", dev.Path, err)
	}
	return nil
}

// Connected lists the connected devices with their backend identifiers.
func (d *Devices) Connected() (map[uint32]string, error) {
	all, err := d.Netlink.StatusAll()
	if err != nil {
		return nil, err
	}
	out := make(map[uint32]string)
	for _, st := range all {
		if st.Connected {
			out[st.Index], _ = readTrimmed(fmt.Sprintf("/sys/block/nbd%d/backend", st.Index))
		}
	}
	return out, nil
}

// WaitUnmounted waits until no file system holds dev: a mounted file
// system claims its block device exclusively, so an O_EXCL open succeeds
// only once the last mount of it is gone and the file system has written
// everything back and shut down.
func (d *Devices) WaitUnmounted(ctx context.Context, dev *Device) error {
	err := poll(ctx, func() (bool, error) {
		fd, err := unix.Open(dev.Path, unix.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
		if err == nil {
			unix.Close(fd)
			return true, nil
		}
		if errors.Is(err, unix.EBUSY) {
			return false, nil
		}
		return false, err
	})
	if err != nil {
		return fmt.Errorf("wait for the file system on %s to go: %w", dev.Path, err)
	}
	return nil
}

// Responds reads dev's first block with O_DIRECT, so from the engine, not
// the page cache. A device whose connection died queues the read until a
// reconnect or the dead-connection timeout: then the read is left to
// finish on its own (its descriptor closed when it does) and Responds
// returns ctx's error.
func (d *Devices) Responds(ctx context.Context, dev *Device) error {
	fd, err := unix.Open(dev.Path, unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", dev.Path, err)
	}
	done := make(chan error, 1)
	go func() {
		defer unix.Close(fd)
		// O_DIRECT wants a buffer aligned to the logical block size;
		// a page is aligned to any.
		buf, err := unix.Mmap(-1, 0, os.Getpagesize(), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
		if err != nil {
			done <- err
			return
		}
		defer unix.Munmap(buf)
		_, err = unix.Pread(fd, buf, 0)
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("read %s: %w", dev.Path, err)
		}
		return nil
	case <-ctx.Done():
		return fmt.Errorf("read %s: %w", dev.Path, ctx.Err())
	}
}
