//go:build !linux

package netlinknbd

import (
	"context"
	"errors"
	"fmt"
	"runtime"
)

// errUnsupported is returned everywhere but on Linux, the only kernel with
// an nbd generic netlink family.
var errUnsupported = fmt.Errorf("netlinknbd: not supported on %s: %w", runtime.GOOS, errors.ErrUnsupported)

type client struct{}

func newClient() (*client, error) { return nil, errUnsupported }

func (*client) Close() error                                 { return errUnsupported }
func (*client) Connect(*ConnectConfig) (uint32, error)       { return 0, errUnsupported }
func (*client) Disconnect(uint32) error                      { return errUnsupported }
func (*client) Reconfigure(uint32, *ReconfigureConfig) error { return errUnsupported }
func (*client) Status(uint32) (DeviceStatus, error)          { return DeviceStatus{}, errUnsupported }
func (*client) StatusAll() ([]DeviceStatus, error)           { return nil, errUnsupported }

type watcher struct{}

func newWatcher() (*watcher, error) { return nil, errUnsupported }

func (*watcher) Close() error                              { return errUnsupported }
func (*watcher) Receive(context.Context) (LinkDead, error) { return LinkDead{}, errUnsupported }
