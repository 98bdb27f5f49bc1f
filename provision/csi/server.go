// Package csi serves mvps volumes to a container orchestrator through the
// Container Storage Interface (CSI): the Identity service, the Node
// service, whose volumes are attachments the provision.Manager holds for a
// volume owner, and the Controller service, whose volumes are image configs
// it records in an ImageStore. Each service is a thin transport: the node
// attaches through the same core, with the same image config checks, state
// records, cross-host exclusivity and adoption after a restart, as every
// other owner.
package csi

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/mvps-provisioner/mvps-provisioner/provision"
	"github.com/mvps-provisioner/mvps-provisioner/provision/imageconfig"
	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
)

// DriverName is the CSI driver's name, as CSIDriver objects, StorageClasses
// and the kubelet's plugin registry know it.
const DriverName = "csi.mvps-provisioner.io"

// SocketPath is endpoint's file system path.
func SocketPath(endpoint string) (string, error) {
	path := endpoint
	if rest, ok := strings.CutPrefix(endpoint, "unix://"); ok {
		path = rest
	} else if strings.Contains(endpoint, "://") {
		return "", fmt.Errorf("CSI endpoint %q: only unix:// endpoints are served", endpoint)
	}
	if !strings.HasPrefix(path, "/") {
		return "", fmt.Errorf("CSI endpoint %q is not an absolute socket path", endpoint)
	}
	return path, nil
}

// NewGRPCServer returns a gRPC server whose calls are logged (method,
// duration, code; never a request, which may carry secrets) and whose
// panics become Internal errors instead of killing a daemon that holds
// devices.
func NewGRPCServer(log *slog.Logger) *grpc.Server {
	return grpc.NewServer(grpc.UnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (resp any, err error) {
		start := time.Now()
		defer func() {
			if p := recover(); p != nil {
				log.Error("CSI call panicked", "method", info.FullMethod, "panic", fmt.Sprint(p))
				resp, err = nil, status.Error(codes.Internal, "internal error")
			}
			level := slog.LevelDebug
			if err != nil {
				level = slog.LevelWarn
			}
			log.Log(ctx, level, "CSI call", "method", info.FullMethod, "code", status.Code(err).String(),
				"took", time.Since(start).Round(time.Microsecond).String(), "err", err)
		}()
		return handler(ctx, req)
	}))
}

// statusCodes pairs each kind of error with its gRPC code, most specific
// first, as the caller socket's reply codes do.
var statusCodes = []struct {
	kind error
	code codes.Code
}{
	{protocol.ErrBadRequest, codes.InvalidArgument},
	{imageconfig.ErrNotFound, codes.NotFound},
	{imageconfig.ErrInvalid, codes.FailedPrecondition},
	{imageconfig.ErrUnavailable, codes.Unavailable},
	{provision.ErrForbidden, codes.PermissionDenied},
	{provision.ErrBusy, codes.FailedPrecondition},
	{provision.ErrEngineUnavailable, codes.Unavailable},
	{provision.ErrShuttingDown, codes.Unavailable},
	{provision.ErrAttachFailed, codes.Internal},
	{context.DeadlineExceeded, codes.DeadlineExceeded},
	{context.Canceled, codes.Canceled},
}

// statusOf turns an error of the core or of an ImageStore into the status
// the orchestrator gets: what a caller is shown, never a concealed truth.
func statusOf(what string, err error) error {
	if c, ok := errors.AsType[*provision.ConcealedError](err); ok {
		err = c.Shown
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	for _, sc := range statusCodes {
		if errors.Is(err, sc.kind) {
			return status.Errorf(sc.code, "%s: %v", what, err)
		}
	}
	return status.Errorf(codes.Internal, "%s: %v", what, err)
}
