package csi

import (
	"context"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// Identity is the CSI Identity service, which every endpoint of the
// driver serves.
type Identity struct {
	csipb.UnimplementedIdentityServer
	version string
	ready   func() error
}

// NewIdentity returns the Identity service of a driver at version; ready,
// when not nil, tells whether the endpoint can serve (Probe).
func NewIdentity(version string, ready func() error) *Identity {
	return &Identity{version: version, ready: ready}
}

// GetPluginInfo names the driver.
func (i *Identity) GetPluginInfo(context.Context, *csipb.GetPluginInfoRequest) (*csipb.GetPluginInfoResponse, error) {
	return &csipb.GetPluginInfoResponse{Name: DriverName, VendorVersion: i.version}, nil
}

// GetPluginCapabilities tells that the driver has a Controller service
// (served by mvps-csi, whichever endpoint is asked: the capability is the
// driver's) and no topology: every node reaches the image store, and one
// node at a time holds a volume through its access mode and Lease, not
// through where it may be used.
func (i *Identity) GetPluginCapabilities(context.Context, *csipb.GetPluginCapabilitiesRequest) (*csipb.GetPluginCapabilitiesResponse, error) {
	return &csipb.GetPluginCapabilitiesResponse{Capabilities: []*csipb.PluginCapability{{
		Type: &csipb.PluginCapability_Service_{Service: &csipb.PluginCapability_Service{
			Type: csipb.PluginCapability_Service_CONTROLLER_SERVICE,
		}},
	}}}, nil
}

// Probe reports whether the endpoint can serve now.
func (i *Identity) Probe(context.Context, *csipb.ProbeRequest) (*csipb.ProbeResponse, error) {
	ok := i.ready == nil || i.ready() == nil
	return &csipb.ProbeResponse{Ready: wrapperspb.Bool(ok)}, nil
}
