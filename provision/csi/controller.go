package csi

import (
	"context"
	"log/slog"
	"strings"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/mvps-provisioner/mvps-provisioner/provision/imageconfig"
	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
)

// ImageStore is where the controller records the image configs of the
// volumes it creates: the image source the nodes look keys up in (a
// directory, or the ConfigMap).
type ImageStore interface {
	// Create records cfg under key unless something is recorded there
	// already, and returns what is recorded under key afterwards.
	Create(ctx context.Context, key string, cfg imageconfig.Config) (imageconfig.Config, error)
	// Get returns key's config; a missing key wraps imageconfig.ErrNotFound.
	Get(ctx context.Context, key string) (imageconfig.Config, error)
	// Delete removes key; a missing key is no error.
	Delete(ctx context.Context, key string) error
}

// Sizes of a new volume.
const (
	// DefaultVolumeSize is the size of a volume created without a
	// capacity range.
	DefaultVolumeSize = 1 << 30
	// pageSize is the engine's page, which every image size is a
	// multiple of.
	pageSize = 4096
)

// Controller is the CSI Controller service: a volume is an image config in
// the store, under the volume's key. Kubernetes decides who may use a
// volume; the nodes look the key up exactly as for any other caller, so a
// static PersistentVolume naming an existing key works the same.
type Controller struct {
	csipb.UnimplementedControllerServer
	store ImageStore
	log   *slog.Logger
	locks keyLocks
}

// NewController returns the Controller service recording in store.
func NewController(store ImageStore, log *slog.Logger) *Controller {
	return &Controller{store: store, log: log}
}

// ControllerGetCapabilities: create and delete only. There is no
// ControllerPublish (the node attaches), and no expansion: see
// docs/kubernetes.md.
func (c *Controller) ControllerGetCapabilities(context.Context, *csipb.ControllerGetCapabilitiesRequest) (*csipb.ControllerGetCapabilitiesResponse, error) {
	return &csipb.ControllerGetCapabilitiesResponse{Capabilities: []*csipb.ControllerServiceCapability{{
		Type: &csipb.ControllerServiceCapability_Rpc{Rpc: &csipb.ControllerServiceCapability_RPC{
			Type: csipb.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME,
		}},
	}}}, nil
}

// CreateVolume records a new image config under the name's key; a second
// call with the same name finds it and answers the same volume, if its size
// fits the request.
func (c *Controller) CreateVolume(ctx context.Context, req *csipb.CreateVolumeRequest) (*csipb.CreateVolumeResponse, error) {
	name := req.GetName()
	if name == "" {
		return nil, status.Error(codes.InvalidArgument, "volume name is required")
	}
	if len(req.GetVolumeCapabilities()) == 0 {
		return nil, status.Error(codes.InvalidArgument, "volume capabilities are required")
	}
	for _, vc := range req.GetVolumeCapabilities() {
		if err := checkCapability(vc); err != nil {
			return nil, err
		}
	}
	for k := range req.GetParameters() {
		// The CSI provisioner strips its own csi.storage.k8s.io/ keys.
		return nil, status.Errorf(codes.InvalidArgument, "StorageClass parameter %q is not known; mvps volumes take none", k)
	}
	if req.GetVolumeContentSource() != nil {
		return nil, status.Error(codes.InvalidArgument, "volumes from snapshots or other volumes are not offered")
	}
	size, err := volumeSize(req.GetCapacityRange())
	if err != nil {
		return nil, err
	}
	key := VolumeKey(name)
	// A second create of the name waits for the first, then finds the
	// volume it recorded.
	unlock, err := c.locks.lock(ctx, key)
	if err != nil {
		return nil, err
	}
	defer unlock()
	imageID, err := newImageID(name)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	got, err := c.store.Create(ctx, key, imageconfig.Config{ImageID: imageID, ImageSize: size})
	if err != nil {
		return nil, statusOf("record the volume's image", err)
	}
	if !fits(got.ImageSize, req.GetCapacityRange()) {
		return nil, status.Errorf(codes.AlreadyExists, "volume %q exists with %d bytes, which the requested capacity range does not allow", name, got.ImageSize)
	}
	if got.ImageID == imageID {
		c.log.Info("volume created", "volume", key, "image_id", imageID, "image_size", size)
	}
	return &csipb.CreateVolumeResponse{Volume: &csipb.Volume{VolumeId: key, CapacityBytes: int64(got.ImageSize)}}, nil
}

// volumeSize is the image size for a capacity range: the required bytes
// rounded up to the engine's page, or the default size, within the limit.
func volumeSize(r *csipb.CapacityRange) (uint64, error) {
	required, limit := r.GetRequiredBytes(), r.GetLimitBytes()
	if required < 0 || limit < 0 {
		return 0, status.Error(codes.InvalidArgument, "capacity range is negative")
	}
	if limit != 0 && required > limit {
		return 0, status.Errorf(codes.InvalidArgument, "required bytes %d exceed the limit %d", required, limit)
	}
	size := uint64(required)
	if required == 0 {
		size = DefaultVolumeSize
		if limit != 0 && uint64(limit) < size {
			size = uint64(limit)
		}
	}
	size = (size + pageSize - 1) / pageSize * pageSize
	if limit != 0 && size > uint64(limit) {
		return 0, status.Errorf(codes.OutOfRange, "the required bytes rounded up to a %d-byte page, %d, exceed the limit %d", pageSize, size, limit)
	}
	return size, nil
}

// fits reports whether an existing volume of size answers a request for r.
func fits(size uint64, r *csipb.CapacityRange) bool {
	if req := r.GetRequiredBytes(); req > 0 && size < uint64(req) {
		return false
	}
	if lim := r.GetLimitBytes(); lim > 0 && size > uint64(lim) {
		return false
	}
	return true
}

// DeleteVolume removes the volume's image config, so no node attaches it
// again. The image's bytes stay in the engine's store: the engine has no
// way to delete an image (docs/kubernetes.md).
func (c *Controller) DeleteVolume(ctx context.Context, req *csipb.DeleteVolumeRequest) (*csipb.DeleteVolumeResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "volume id is required")
	}
	if protocol.ValidateKey(id) != nil {
		// No such key can be recorded: nothing to delete.
		return &csipb.DeleteVolumeResponse{}, nil
	}
	unlock, err := c.locks.lock(ctx, id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := c.store.Delete(ctx, id); err != nil {
		return nil, statusOf("remove the volume's image config", err)
	}
	c.log.Info("volume deleted", "volume", id)
	return &csipb.DeleteVolumeResponse{}, nil
}

// ValidateVolumeCapabilities confirms the capabilities an existing volume
// offers.
func (c *Controller) ValidateVolumeCapabilities(ctx context.Context, req *csipb.ValidateVolumeCapabilitiesRequest) (*csipb.ValidateVolumeCapabilitiesResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "volume id is required")
	}
	if len(req.GetVolumeCapabilities()) == 0 {
		return nil, status.Error(codes.InvalidArgument, "volume capabilities are required")
	}
	if err := protocol.ValidateKey(id); err != nil {
		return nil, status.Errorf(codes.NotFound, "volume %q: %v", id, err)
	}
	if _, err := c.store.Get(ctx, id); err != nil {
		return nil, statusOf("look the volume up", err)
	}
	var refused []string
	for _, vc := range req.GetVolumeCapabilities() {
		if err := checkCapability(vc); err != nil {
			refused = append(refused, status.Convert(err).Message())
		}
	}
	if len(refused) > 0 {
		return &csipb.ValidateVolumeCapabilitiesResponse{Message: strings.Join(refused, "; ")}, nil
	}
	return &csipb.ValidateVolumeCapabilitiesResponse{Confirmed: &csipb.ValidateVolumeCapabilitiesResponse_Confirmed{
		VolumeContext:      req.GetVolumeContext(),
		VolumeCapabilities: req.GetVolumeCapabilities(),
		Parameters:         req.GetParameters(),
	}}, nil
}
