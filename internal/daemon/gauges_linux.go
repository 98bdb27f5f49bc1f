package daemon

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/provision"
	"github.com/mvps-provisioner/mvps-provisioner/provision/admin"
	"github.com/mvps-provisioner/mvps-provisioner/provision/engine"
	"github.com/mvps-provisioner/mvps-provisioner/provision/metrics"
)

// engineProbeTimeout bounds the engine's greeting at a scrape, well within
// Prometheus's default scrape timeout of 10 s.
const engineProbeTimeout = 2 * time.Second

// gauges reads what the metrics report at each scrape from the Manager's
// snapshot, the engine and the kernel, so that the attach core needs no
// metric of its own.
func (o *operations) gauges() metrics.Gauges {
	o.mu.Lock()
	mgr, srv := o.mgr, o.srv
	o.mu.Unlock()
	g := metrics.Gauges{States: map[string]int{}}
	if o.cfg.ImagesLastSync != nil {
		g.ConfigMapLastSync = o.cfg.ImagesLastSync()
	}
	if mgr == nil {
		return g
	}
	core := mgr.Gauges()
	g.Active, g.Lingering, g.Waiting = core.Active, core.Lingering, srv.Waiting()
	snapshot := mgr.Snapshot()
	for _, info := range snapshot {
		g.States[string(info.State)]++
	}
	ctx, cancel := context.WithTimeout(context.Background(), engineProbeTimeout)
	defer cancel()
	g.EngineUp = o.engineAnswers(ctx) == nil
	foreign, err := o.foreignDevices(snapshot)
	if err != nil {
		o.log.Debug("metrics: nbd devices", "err", err)
	}
	g.Foreign = len(foreign)
	return g
}

// foreignDevices lists the connected nbd devices with an mvps backend
// (/sys/block/nbdX/backend) that no attachment of snapshot owns: another
// instance's, or left over from a crash. Devices of other NBD users
// (nbd-client, qemu-nbd) are not ours to judge and are left out.
func (o *operations) foreignDevices(snapshot []provision.Info) ([]admin.Device, error) {
	o.mu.Lock()
	devices := o.devices
	o.mu.Unlock()
	if devices == nil {
		return nil, nil
	}
	owned := make(map[string]bool)
	for _, info := range snapshot {
		owned[engine.BackendID(info.ImageID)] = true
		if info.Device != "" {
			owned[info.Device] = true
		}
	}
	sts, err := devices.Netlink.StatusAll()
	if err != nil {
		return nil, err
	}
	var foreign []admin.Device
	for _, d := range sts {
		if !d.Connected {
			continue
		}
		path := fmt.Sprintf("/dev/nbd%d", d.Index)
		backend, _ := os.ReadFile(fmt.Sprintf("/sys/block/nbd%d/backend", d.Index))
		id := strings.TrimSpace(string(backend))
		if strings.HasPrefix(id, engine.BackendPrefix) && !owned[path] && !owned[id] {
			foreign = append(foreign, admin.Device{Device: path, Backend: id})
		}
	}
	return foreign, nil
}
