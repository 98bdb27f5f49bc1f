package provision_test

import (
	"context"
	"testing"

	"github.com/mvps-provisioner/mvps-provisioner/provision"
	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
	"github.com/mvps-provisioner/mvps-provisioner/provision/provisiontest"
)

// BenchmarkAttachDetach is one fd-mode attach through the caller socket, the
// whole daemon path (request, config, token, engine session with its probe,
// state records) with the kernel replaced by files, then the caller's close
// and the detach it starts. It is the daemon's own share of an attach, so
// that a regression in it shows without a VM (make bench runs the VM side).
func BenchmarkAttachDetach(b *testing.B) {
	state, err := provision.OpenStateDir(provisiontest.MemoryDir(b))
	if err != nil {
		b.Fatal(err)
	}
	defer state.Close()
	ts := provisiontest.New(b, func(c *provisiontest.Config) { c.State = state })
	ts.AddImage(b, "vol", "vol.mvps-image", 1<<20)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		a, err := protocol.Attach(ctx, ts.Socket, "vol")
		if err != nil {
			b.Fatal(err)
		}
		a.Close()
		ts.Devices.WaitDetaches(b, 1)
	}
}
