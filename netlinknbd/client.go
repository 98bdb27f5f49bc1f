// Package netlinknbd configures the Linux kernel's NBD client (the nbd
// module, /dev/nbdN) through its "nbd" generic netlink family.
//
// The kernel only implements the NBD transmission phase: a userspace
// program performs the handshake with the server, then hands the connected
// socket(s) together with the negotiated size and flags to Connect. From
// then on the kernel serves /dev/nbdN without any userspace process, which
// is the advantage over the older ioctl interface.
//
// Kernel behaviour worth knowing (drivers/block/nbd.c):
//
//   - Connect, Disconnect and Reconfigure need CAP_SYS_ADMIN in the initial
//     user namespace, both for the opener of the netlink socket and the
//     caller; otherwise they fail with an error matching os.ErrPermission.
//     Status needs no privileges.
//   - Connect without an index reuses an idle device or creates a new one;
//     with an index it creates the device if needed and fails with ErrBusy
//     if the device has a configuration, which also happens while some
//     process (udev, blkid) holds the idle device open.
//   - Disconnect sends NBD_CMD_DISC on every connection, shuts the sockets
//     down and fails outstanding I/O. The device keeps existing (size 0)
//     unless ClientFlagDestroyOnDisconnect was set. Disconnecting an idle
//     device succeeds and does nothing. The device is only fully released
//     once every opener has closed it, so Status may report it connected
//     for a while after Disconnect returns.
//   - When a connection breaks (server closed it, I/O error, timeout) the
//     kernel multicasts a link-dead event, see Watcher. With a
//     DeadConnTimeout the device then waits that long for Reconfigure to
//     supply a replacement socket before failing I/O.
//
// Each Client owns one netlink socket and serialises its requests on it, so
// it is safe for concurrent use.
package netlinknbd

import (
	"fmt"
)

// A Client sends requests to the kernel's nbd generic netlink family.
type Client struct {
	c *client
}

// New opens a netlink socket and looks up the nbd family. If the nbd module
// is not loaded (and cannot be auto-loaded), the error matches
// os.ErrNotExist.
func New() (*Client, error) {
	c, err := newClient()
	if err != nil {
		return nil, err
	}
	return &Client{c: c}, nil
}

// Close releases the netlink socket. Connected devices are unaffected.
func (c *Client) Close() error {
	return c.c.Close()
}

// Connect hands cfg.Sockets to the kernel and starts serving the device; it
// returns the index N of /dev/nbdN. The call does not wait for any I/O.
func (c *Client) Connect(cfg ConnectConfig) (uint32, error) {
	op := "connect"
	if cfg.Index != nil {
		op = fmt.Sprintf("connect nbd%d", *cfg.Index)
	}
	if err := cfg.validate(); err != nil {
		return 0, fmt.Errorf("netlinknbd: %s: %w", op, err)
	}
	index, err := c.c.Connect(&cfg)
	if err != nil {
		return 0, fmt.Errorf("netlinknbd: %s: %w", op, err)
	}
	return index, nil
}

// Disconnect disconnects /dev/nbd<index>. An unknown index gives an error
// matching os.ErrNotExist; an existing idle device is not an error.
func (c *Client) Disconnect(index uint32) error {
	if err := c.c.Disconnect(index); err != nil {
		return fmt.Errorf("netlinknbd: disconnect nbd%d: %w", index, err)
	}
	return nil
}

// Reconfigure changes a connected device, most importantly to replace dead
// connections after a link-dead event. An unknown index gives an error
// matching os.ErrNotExist and an idle device one matching ErrNotConnected.
func (c *Client) Reconfigure(index uint32, cfg ReconfigureConfig) error {
	if err := cfg.validate(); err != nil {
		return fmt.Errorf("netlinknbd: reconfigure nbd%d: %w", index, err)
	}
	if err := c.c.Reconfigure(index, &cfg); err != nil {
		return fmt.Errorf("netlinknbd: reconfigure nbd%d: %w", index, err)
	}
	return nil
}

// DeviceStatus is the kernel's view of one nbd device.
type DeviceStatus struct {
	Index uint32

	// Connected reports that the device has a configuration. That is the
	// case while it is connected, until a disconnected device's last
	// opener is gone, and also while an idle device is merely held open.
	Connected bool
}

// Status reports on /dev/nbd<index>. An unknown index gives an error
// matching os.ErrNotExist.
func (c *Client) Status(index uint32) (DeviceStatus, error) {
	st, err := c.c.Status(index)
	if err != nil {
		return DeviceStatus{}, fmt.Errorf("netlinknbd: status nbd%d: %w", index, err)
	}
	return st, nil
}

// StatusAll reports on every nbd device, sorted by index.
func (c *Client) StatusAll() ([]DeviceStatus, error) {
	sts, err := c.c.StatusAll()
	if err != nil {
		return nil, fmt.Errorf("netlinknbd: status: %w", err)
	}
	return sts, nil
}
