package netlinknbd_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net"
	"syscall"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/netlinknbd"
)

// handshake stands for the NBD handshake, which is not this package's job:
// it dials the server, negotiates an export and returns the connection
// together with the export's size and transmission flags.
func handshake(ctx context.Context) (conn *net.TCPConn, size uint64, flags uint16, err error) {
	return nil, 0, 0, errors.New("handshake: not part of this example")
}

// Example attaches an export as /dev/nbdN and keeps it attached across
// connection losses by handing the kernel a fresh connection after each
// link-dead event.
func Example() {
	ctx := context.Background()
	const backend = "server.example:10809/disk0"

	c, err := netlinknbd.New()
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	// Subscribe before connecting so no event can slip through.
	w, err := netlinknbd.NewWatcher()
	if err != nil {
		log.Fatal(err)
	}
	defer w.Close()

	conn, size, flags, err := handshake(ctx)
	if err != nil {
		log.Fatal(err)
	}
	index, err := c.Connect(netlinknbd.ConnectConfig{
		Sockets:     []syscall.Conn{conn},
		Size:        size,
		BlockSize:   4096,
		ServerFlags: uint64(flags),
		// Keep I/O waiting, rather than failing, while we reconnect.
		DeadConnTimeout:   2 * time.Minute,
		BackendIdentifier: backend,
	})
	// The kernel holds its own reference to the socket.
	conn.Close()
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("attached as /dev/nbd%d\n", index)

	for {
		ev, err := w.Receive(ctx)
		if err != nil {
			log.Fatal(err)
		}
		if ev.Index != index {
			continue
		}
		conn, _, _, err := handshake(ctx)
		if err != nil {
			log.Fatal(err)
		}
		err = c.Reconfigure(index, netlinknbd.ReconfigureConfig{
			Sockets:           []syscall.Conn{conn},
			BackendIdentifier: backend, // required once Connect set one
		})
		conn.Close()
		if err != nil {
			log.Fatal(err)
		}
	}
}
