// Command chaos-caller is the caller that TestVMFaultChaos kills, 500 times
// over: it connects to the provisioner and, at the moment CHAOS_MOMENT
// names, prints a line and waits to be killed. 0: before sending the
// request; 1: right after sending it (the attach is under way); 2: after
// the reply; 3: after a write through the device.
//
// It is a binary of its own, not the test binary playing a part, because
// the guest emulates its CPU: the test binary's start-up (64 MB, and the
// package initialisation of everything the VM tests import) was most of
// each cycle.
package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"strconv"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
)

func main() {
	moment, err := strconv.Atoi(os.Getenv("CHAOS_MOMENT"))
	socket, key := os.Getenv("CHAOS_SOCKET"), os.Getenv("CHAOS_KEY")
	if err != nil || socket == "" || key == "" {
		fmt.Fprintln(os.Stderr, "chaos-caller: set CHAOS_MOMENT (0 to 3), CHAOS_SOCKET and CHAOS_KEY")
		os.Exit(2)
	}
	fmt.Println(run(moment, socket, key))
	select {} // killed here
}

// run gets to the moment and says how it went.
func run(moment int, socket, key string) string {
	if moment <= 1 {
		c, err := net.Dial("unixpacket", socket)
		if err != nil {
			return "error " + err.Error()
		}
		if moment == 0 {
			return "connected"
		}
		c.Write(protocol.AppendRequest(nil, protocol.CommandAttach, key))
		return "requested"
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	a, err := protocol.Attach(ctx, socket, key)
	if err != nil {
		// Busy while the previous caller's device is detached: the kill
		// now is a kill before the reply.
		return "refused " + err.Error()
	}
	if moment == 2 {
		return "attached"
	}
	a.Device.WriteAt(make([]byte, 4096), 0)
	return "wrote"
}
