package csi

import (
	"context"
	"errors"
	"log/slog"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/mvps-provisioner/mvps-provisioner/provision"
)

// Node is the CSI Node service. A staged volume is an attachment whose
// owner is the volume: the Manager keeps it, and its state record, until
// NodeUnstageVolume ends it, across restarts of the daemon. A mount volume
// is mounted at the staging path with mount mode's rules (nosuid,nodev,
// formatted only when provably fresh) and bind-mounted into each pod's
// target path; a block volume's device node is bind-mounted onto each
// target.
type Node struct {
	csipb.UnimplementedNodeServer
	m      *provision.Manager
	nodeID string
	// maxVolumes is how many volumes the node takes; 0 for no bound.
	maxVolumes int64
	log        *slog.Logger
	locks      keyLocks
}

// NewNode returns the Node service attaching through m. nodeID is the
// node's identity, the same the Leases name as holder.
func NewNode(m *provision.Manager, nodeID string, maxVolumes int64, log *slog.Logger) *Node {
	return &Node{m: m, nodeID: nodeID, maxVolumes: maxVolumes, log: log}
}

// NodeGetCapabilities: staging, and volume stats.
func (n *Node) NodeGetCapabilities(context.Context, *csipb.NodeGetCapabilitiesRequest) (*csipb.NodeGetCapabilitiesResponse, error) {
	var caps []*csipb.NodeServiceCapability
	for _, t := range []csipb.NodeServiceCapability_RPC_Type{
		csipb.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME,
		csipb.NodeServiceCapability_RPC_GET_VOLUME_STATS,
	} {
		caps = append(caps, &csipb.NodeServiceCapability{Type: &csipb.NodeServiceCapability_Rpc{
			Rpc: &csipb.NodeServiceCapability_RPC{Type: t},
		}})
	}
	return &csipb.NodeGetCapabilitiesResponse{Capabilities: caps}, nil
}

// NodeGetInfo names the node. It reports no topology: any node reaches
// the store, and the access mode with the image's Lease keeps a volume on
// one node at a time.
func (n *Node) NodeGetInfo(context.Context, *csipb.NodeGetInfoRequest) (*csipb.NodeGetInfoResponse, error) {
	return &csipb.NodeGetInfoResponse{NodeId: n.nodeID, MaxVolumesPerNode: n.maxVolumes}, nil
}

// begin checks a call's required fields, the volume id and the pairs of
// name and value in fields, and takes the volume's lock for the call,
// waiting for a call that holds it (keyLocks.lock).
func (n *Node) begin(ctx context.Context, id string, fields ...string) (func(), error) {
	if err := required(append([]string{"volume id", id}, fields...)...); err != nil {
		return nil, err
	}
	return n.locks.lock(ctx, id)
}

// required answers InvalidArgument for the first empty field.
func required(fields ...string) error {
	for i := 0; i+1 < len(fields); i += 2 {
		if fields[i+1] == "" {
			return status.Errorf(codes.InvalidArgument, "%s is required", fields[i])
		}
	}
	return nil
}

// errUnstaged ends a volume's attachment at NodeUnstageVolume.
var errUnstaged = errors.New("volume unstaged")
