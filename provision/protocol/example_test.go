package protocol_test

import (
	"context"
	"fmt"
	"log"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
)

// Attach an image in fd mode: the device is the caller's until the
// attachment is closed (or the caller dies), when the provisioner flushes
// and detaches it.
func ExampleAttach() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	a, err := protocol.Attach(ctx, "/run/mvps-provisioner/provisioner.sock", "demo")
	if err != nil {
		// A refusal is a *protocol.ReplyError with its code.
		log.Fatal(err)
	}
	defer a.Close()
	if _, err := a.Device.WriteAt([]byte("hello"), 0); err != nil {
		log.Fatal(err)
	}
	fmt.Println("wrote to", a.Device.Name())
}
