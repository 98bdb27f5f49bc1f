package csi

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/mvps-provisioner/mvps-provisioner/provision/imageconfig"
	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
)

var discard = slog.New(slog.NewTextHandler(io.Discard, nil))

func mountCapability(mode csipb.VolumeCapability_AccessMode_Mode, fs string, flags ...string) *csipb.VolumeCapability {
	return &csipb.VolumeCapability{
		AccessMode: &csipb.VolumeCapability_AccessMode{Mode: mode},
		AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{FsType: fs, MountFlags: flags}},
	}
}

var writer = mountCapability(csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, "ext4")

func createReq(name string, required, limit int64) *csipb.CreateVolumeRequest {
	return &csipb.CreateVolumeRequest{Name: name, VolumeCapabilities: []*csipb.VolumeCapability{writer},
		CapacityRange: &csipb.CapacityRange{RequiredBytes: required, LimitBytes: limit}}
}

func wantCode(t *testing.T, err error, code codes.Code) {
	t.Helper()
	if status.Code(err) != code {
		t.Fatalf("got %v, want code %v", err, code)
	}
}

func TestCreateVolumeRecordsAnImageConfig(t *testing.T) {
	dir := t.TempDir()
	c := NewController(imageconfig.Dir(dir), discard)
	ctx := context.Background()
	r, err := c.CreateVolume(ctx, createReq("pvc-0a1b", 10<<20+1, 0))
	if err != nil {
		t.Fatal(err)
	}
	id := r.GetVolume().GetVolumeId()
	if id != "pvc-0a1b" || r.GetVolume().GetCapacityBytes() != 10<<20+4096 {
		t.Fatalf("volume %q of %d bytes", id, r.GetVolume().GetCapacityBytes())
	}
	cfg, err := imageconfig.Load(dir, id)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.ImageSize != 10<<20+4096 || !strings.HasPrefix(cfg.ImageID, "pvc-0a1b-") {
		t.Fatalf("recorded %+v", cfg)
	}

	// Again, same name: the same volume, the same image.
	again, err := c.CreateVolume(ctx, createReq("pvc-0a1b", 10<<20, 11<<20))
	if err != nil || again.GetVolume().GetVolumeId() != id {
		t.Fatalf("create again: %v, %v", again, err)
	}
	if cfg2, _ := imageconfig.Load(dir, id); cfg2.ImageID != cfg.ImageID {
		t.Fatalf("create again changed the image: %s, then %s", cfg.ImageID, cfg2.ImageID)
	}
	// Same name, a size the volume does not have.
	_, err = c.CreateVolume(ctx, createReq("pvc-0a1b", 20<<20, 0))
	wantCode(t, err, codes.AlreadyExists)

	if _, err := c.ValidateVolumeCapabilities(ctx, &csipb.ValidateVolumeCapabilitiesRequest{VolumeId: id,
		VolumeCapabilities: []*csipb.VolumeCapability{writer}}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, id)); !os.IsNotExist(err) {
		t.Fatalf("config after DeleteVolume: %v", err)
	}
	if _, err := c.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatalf("DeleteVolume again: %v", err)
	}
	_, err = c.ValidateVolumeCapabilities(ctx, &csipb.ValidateVolumeCapabilitiesRequest{VolumeId: id,
		VolumeCapabilities: []*csipb.VolumeCapability{writer}})
	wantCode(t, err, codes.NotFound)

	// Made again after the delete: a new image, never the old bytes.
	if _, err := c.CreateVolume(ctx, createReq("pvc-0a1b", 10<<20, 0)); err != nil {
		t.Fatal(err)
	}
	if cfg3, _ := imageconfig.Load(dir, id); cfg3.ImageID == cfg.ImageID {
		t.Fatalf("a volume made again after its delete reuses image %s", cfg.ImageID)
	}
}

func TestConcurrentCreatesAgree(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	var wg sync.WaitGroup
	ids := make([]string, 8)
	for i := range ids {
		wg.Go(func() {
			// Separate controllers: replicas, not one process's lock.
			c := NewController(imageconfig.Dir(dir), discard)
			for {
				r, err := c.CreateVolume(ctx, createReq("pvc-race", 1<<20, 0))
				if status.Code(err) == codes.Aborted {
					continue
				}
				if err != nil {
					t.Error(err)
					return
				}
				cfg, _ := imageconfig.Load(dir, r.GetVolume().GetVolumeId())
				ids[i] = cfg.ImageID
				return
			}
		})
	}
	wg.Wait()
	for _, id := range ids {
		if id != ids[0] {
			t.Fatalf("concurrent creates answered different images: %v", ids)
		}
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("directory holds %d entries after the creates, want 1", len(entries))
	}
}

// gatedStore is a directory store whose Create, once entered, says so on
// entered and waits for release: a create that holds its name's lock for
// as long as a test needs.
type gatedStore struct {
	imageconfig.Dir
	entered chan struct{}
	release chan struct{}
}

func newGatedStore(t *testing.T) *gatedStore {
	return &gatedStore{Dir: imageconfig.Dir(t.TempDir()), entered: make(chan struct{}, 1), release: make(chan struct{})}
}

func (s *gatedStore) Create(ctx context.Context, key string, cfg imageconfig.Config) (imageconfig.Config, error) {
	select {
	case s.entered <- struct{}{}:
	default:
	}
	<-s.release
	return s.Dir.Create(ctx, key, cfg)
}

// Concurrent creates of one name on one controller (the CO retried a call
// it lost track of) all answer OK with the one volume: the later ones wait
// for the first, then find what it recorded.
func TestConcurrentCreatesOnOneControllerWait(t *testing.T) {
	store := newGatedStore(t)
	c := NewController(store, discard)
	ctx := context.Background()
	answers := make([]*csipb.Volume, 8)
	errs := make([]error, len(answers))
	var wg sync.WaitGroup
	create := func(i int) {
		wg.Go(func() {
			r, err := c.CreateVolume(ctx, createReq("pvc-one", 1<<20, 0))
			answers[i], errs[i] = r.GetVolume(), err
		})
	}
	create(0)
	<-store.entered // the first holds the name's lock, in the store
	for i := 1; i < len(answers); i++ {
		create(i)
	}
	time.Sleep(100 * time.Millisecond) // the others reach the lock
	close(store.release)
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("create %d: %v", i, err)
		}
	}
	cfg, err := imageconfig.Load(string(store.Dir), "pvc-one")
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range answers {
		if v.GetVolumeId() != "pvc-one" || v.GetCapacityBytes() != int64(cfg.ImageSize) {
			t.Fatalf("answers differ: %v", answers)
		}
	}
	if entries, _ := os.ReadDir(string(store.Dir)); len(entries) != 1 {
		t.Fatalf("directory holds %d entries after the creates, want 1", len(entries))
	}
}

// A call waiting for another on its volume ends with its context, with the
// context's code, or after maxWait with Aborted; a DeleteVolume waits as a
// CreateVolume does.
func TestWaitForABusyVolumeIsBounded(t *testing.T) {
	store := newGatedStore(t)
	c := NewController(store, discard)
	done := make(chan error, 1)
	go func() {
		_, err := c.CreateVolume(context.Background(), createReq("pvc-busy", 1<<20, 0))
		done <- err
	}()
	<-store.entered

	short, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	_, err := c.CreateVolume(short, createReq("pvc-busy", 1<<20, 0))
	wantCode(t, err, codes.DeadlineExceeded)
	_, err = c.DeleteVolume(short, &csipb.DeleteVolumeRequest{VolumeId: "pvc-busy"})
	wantCode(t, err, codes.DeadlineExceeded)

	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	_, err = c.DeleteVolume(cancelled, &csipb.DeleteVolumeRequest{VolumeId: "pvc-busy"})
	wantCode(t, err, codes.Canceled)

	c.locks.maxWait = 20 * time.Millisecond
	_, err = c.CreateVolume(context.Background(), createReq("pvc-busy", 1<<20, 0))
	wantCode(t, err, codes.Aborted)
	c.locks.maxWait = 0

	// Another name is not held up.
	if _, err := c.DeleteVolume(context.Background(), &csipb.DeleteVolumeRequest{VolumeId: "pvc-other"}); err != nil {
		t.Fatal(err)
	}

	// A delete queued behind the create runs after it.
	deleted := make(chan error, 1)
	go func() {
		_, err := c.DeleteVolume(context.Background(), &csipb.DeleteVolumeRequest{VolumeId: "pvc-busy"})
		deleted <- err
	}()
	time.Sleep(20 * time.Millisecond)
	close(store.release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if err := <-deleted; err != nil {
		t.Fatal(err)
	}
	if _, err := imageconfig.Load(string(store.Dir), "pvc-busy"); !errors.Is(err, imageconfig.ErrNotFound) {
		t.Fatalf("config after the queued delete: %v", err)
	}
}

func TestCreateVolumeRefuses(t *testing.T) {
	c := NewController(imageconfig.Dir(t.TempDir()), discard)
	ctx := context.Background()
	multi := mountCapability(csipb.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER, "")
	for _, tc := range []struct {
		name string
		req  *csipb.CreateVolumeRequest
		code codes.Code
	}{
		{"no name", createReq("", 1<<20, 0), codes.InvalidArgument},
		{"no capability", &csipb.CreateVolumeRequest{Name: "v"}, codes.InvalidArgument},
		{"multi-node writer", &csipb.CreateVolumeRequest{Name: "v", VolumeCapabilities: []*csipb.VolumeCapability{multi}}, codes.InvalidArgument},
		{"xfs", &csipb.CreateVolumeRequest{Name: "v", VolumeCapabilities: []*csipb.VolumeCapability{
			mountCapability(csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, "xfs")}}, codes.InvalidArgument},
		{"unknown mount flag", &csipb.CreateVolumeRequest{Name: "v", VolumeCapabilities: []*csipb.VolumeCapability{
			mountCapability(csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, "ext4", "suid")}}, codes.InvalidArgument},
		{"parameter", &csipb.CreateVolumeRequest{Name: "v", VolumeCapabilities: []*csipb.VolumeCapability{writer},
			Parameters: map[string]string{"replicas": "3"}}, codes.InvalidArgument},
		{"required over limit", createReq("v", 2<<20, 1<<20), codes.InvalidArgument},
		{"limit under a page", createReq("v", 1, 100), codes.OutOfRange},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := c.CreateVolume(ctx, tc.req)
			wantCode(t, err, tc.code)
		})
	}
}

func TestVolumeSizeDefaults(t *testing.T) {
	for _, tc := range []struct {
		required, limit int64
		want            uint64
	}{
		{0, 0, DefaultVolumeSize},
		{0, 1 << 20, 1 << 20},
		{1, 0, 4096},
		{4096, 4096, 4096},
		{1<<30 + 1, 0, 1<<30 + 4096},
	} {
		got, err := volumeSize(&csipb.CapacityRange{RequiredBytes: tc.required, LimitBytes: tc.limit})
		if err != nil || got != tc.want {
			t.Errorf("volumeSize(%d, %d) = %d, %v; want %d", tc.required, tc.limit, got, err, tc.want)
		}
	}
}

func TestVolumeKey(t *testing.T) {
	long := strings.Repeat("a", 300)
	for _, name := range []string{"pvc-5b7c9e0e-3d1a-4a57-9c3a-0f8b2b1e2d3c", "Sanity/Name With Spaces", long, ".hidden", "ünïcode"} {
		key := VolumeKey(name)
		if err := protocol.ValidateKey(key); err != nil {
			t.Errorf("VolumeKey(%q) = %q: %v", name, key, err)
		}
		if VolumeKey(name) != key {
			t.Errorf("VolumeKey(%q) is not stable", name)
		}
		id, err := newImageID(name)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := (imageconfig.Config{ImageID: id, ImageSize: 4096}).Marshal(); err != nil {
			t.Errorf("image id %q of %q: %v", id, name, err)
		}
	}
	if VolumeKey("a b") == VolumeKey("a_b") || VolumeKey("a b") == VolumeKey("ab") {
		t.Error("names that clean alike share a key")
	}
}
