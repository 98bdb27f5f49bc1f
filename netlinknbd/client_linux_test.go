//go:build linux

package netlinknbd

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/genetlink/genltest"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// request is an nbd command as the fake kernel decoded it. Pointer fields
// are nil when the attribute was absent, which is what most tests are about.
type request struct {
	Command         uint8
	Version         uint8
	Flags           netlink.HeaderFlags
	Index           *uint32
	Size            *uint64
	BlockSize       *uint64
	Timeout         *uint64
	ServerFlags     *uint64
	ClientFlags     *uint64
	DeadConnTimeout *uint64
	Sockets         []uint32
	Backend         *string
	Unknown         []uint16
}

func decodeRequest(greq genetlink.Message, nreq netlink.Message) (request, error) {
	r := request{
		Command: greq.Header.Command,
		Version: greq.Header.Version,
		Flags:   nreq.Header.Flags,
	}
	if nreq.Header.Type != netlink.HeaderType(testFamily.ID) {
		return r, fmt.Errorf("request for family %d, want %d", nreq.Header.Type, testFamily.ID)
	}
	ad, err := netlink.NewAttributeDecoder(greq.Data)
	if err != nil {
		return r, err
	}
	u64 := func() *uint64 { return new(ad.Uint64()) }
	for ad.Next() {
		switch ad.Type() {
		case attrIndex:
			r.Index = new(ad.Uint32())
		case attrSizeBytes:
			r.Size = u64()
		case attrBlockSizeBytes:
			r.BlockSize = u64()
		case attrTimeout:
			r.Timeout = u64()
		case attrServerFlags:
			r.ServerFlags = u64()
		case attrClientFlags:
			r.ClientFlags = u64()
		case attrDeadConnTimeout:
			r.DeadConnTimeout = u64()
		case attrSockets:
			r.Sockets = []uint32{}
			ad.Nested(func(nad *netlink.AttributeDecoder) error {
				for nad.Next() {
					if nad.Type() != sockItem {
						return fmt.Errorf("socket list holds attribute %d", nad.Type())
					}
					nad.Nested(func(iad *netlink.AttributeDecoder) error {
						for iad.Next() {
							if iad.Type() != sockFD {
								return fmt.Errorf("socket item holds attribute %d", iad.Type())
							}
							r.Sockets = append(r.Sockets, iad.Uint32())
						}
						return nil
					})
				}
				return nil
			})
		case attrBackendIdentifier:
			// The kernel policy is NLA_STRING; send it as a C string.
			b := ad.Bytes()
			if len(b) == 0 || b[len(b)-1] != 0 {
				return r, fmt.Errorf("backend identifier %q is not NUL-terminated", b)
			}
			r.Backend = new(string(b[:len(b)-1]))
		default:
			r.Unknown = append(r.Unknown, ad.Type())
		}
	}
	return r, ad.Err()
}

// fakeKernel records the nbd requests it gets and answers each command with
// a canned reply or errno.
type fakeKernel struct {
	t *testing.T

	mu       sync.Mutex
	requests []request
	replies  map[uint8][]genetlink.Message
	errnos   map[uint8]unix.Errno
}

func newFakeKernel(t *testing.T) *fakeKernel {
	return &fakeKernel{t: t, replies: map[uint8][]genetlink.Message{}, errnos: map[uint8]unix.Errno{}}
}

func (k *fakeKernel) serve(greq genetlink.Message, nreq netlink.Message) ([]genetlink.Message, error) {
	r, err := decodeRequest(greq, nreq)
	if err != nil {
		k.t.Errorf("bad request: %v", err)
		return nil, unix.EINVAL
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	k.requests = append(k.requests, r)
	if errno, ok := k.errnos[r.Command]; ok {
		return nil, errno
	}
	return k.replies[r.Command], nil
}

func (k *fakeKernel) got() []request {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.requests
}

func indexMessage(cmd uint8, index uint32) genetlink.Message {
	ae := netlink.NewAttributeEncoder()
	ae.Uint32(attrIndex, index)
	return genetlink.Message{
		Header: genetlink.Header{Command: cmd, Version: familyVersion},
		Data:   must(ae.Encode()),
	}
}

// statusMessage encodes a STATUS reply the way nbd_genl_status does,
// including its nests without NLA_F_NESTED.
func statusMessage(devs ...DeviceStatus) genetlink.Message {
	ae := netlink.NewAttributeEncoder()
	ae.Do(attrDeviceList, func() ([]byte, error) {
		lae := netlink.NewAttributeEncoder()
		for _, d := range devs {
			lae.Do(deviceItem, func() ([]byte, error) {
				iae := netlink.NewAttributeEncoder()
				iae.Uint32(deviceIndex, d.Index)
				var c uint8
				if d.Connected {
					c = 1
				}
				iae.Uint8(deviceConnected, c)
				return iae.Encode()
			})
		}
		return lae.Encode()
	})
	return genetlink.Message{
		Header: genetlink.Header{Command: cmdStatus, Version: familyVersion},
		Data:   must(ae.Encode()),
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// socketFile returns one end of a fresh socket pair and its descriptor.
func socketFile(t *testing.T) (*os.File, uint32) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("socketpair: %v", err)
	}
	a, b := os.NewFile(uintptr(fds[0]), "a"), os.NewFile(uintptr(fds[1]), "b")
	t.Cleanup(func() {
		_ = a.Close()
		_ = b.Close()
	})
	return a, uint32(fds[0])
}

const ackFlags = netlink.Request | netlink.Acknowledge

func TestConnectRequest(t *testing.T) {
	s1, fd1 := socketFile(t)
	s2, fd2 := socketFile(t)

	tests := []struct {
		name string
		cfg  ConnectConfig
		want request
	}{
		{
			name: "any index, required fields only",
			cfg:  ConnectConfig{Sockets: []syscall.Conn{s1}, Size: 64 << 20},
			want: request{
				Command: cmdConnect,
				Version: familyVersion,
				Flags:   ackFlags,
				Size:    new(uint64(64 << 20)),
				Sockets: []uint32{fd1},
			},
		},
		{
			name: "everything set",
			cfg: ConnectConfig{
				Index:             new(uint32(5)),
				Sockets:           []syscall.Conn{s1, s2},
				Size:              1 << 30,
				BlockSize:         4096,
				ServerFlags:       1 | serverFlagCanMultiConn,
				ClientFlags:       ClientFlagDestroyOnDisconnect | ClientFlagDisconnectOnClose,
				Timeout:           1500 * time.Millisecond,
				DeadConnTimeout:   time.Minute,
				BackendIdentifier: "vm-42/disk0",
			},
			want: request{
				Command:         cmdConnect,
				Version:         familyVersion,
				Flags:           ackFlags,
				Index:           new(uint32(5)),
				Size:            new(uint64(1 << 30)),
				BlockSize:       new(uint64(4096)),
				Timeout:         new(uint64(2)),
				ServerFlags:     new(uint64(1 | serverFlagCanMultiConn)),
				ClientFlags:     new(uint64(3)),
				DeadConnTimeout: new(uint64(60)),
				Sockets:         []uint32{fd1, fd2},
				Backend:         new("vm-42/disk0"),
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := newFakeKernel(t)
			k.replies[cmdConnect] = []genetlink.Message{indexMessage(cmdConnect, 7)}
			c, _ := testClient(t, genltest.CheckRequest(testFamily.ID, cmdConnect, ackFlags, k.serve))

			index, err := c.Connect(tt.cfg)
			if err != nil {
				t.Fatalf("Connect: %v", err)
			}
			if index != 7 {
				t.Errorf("index = %d, want 7 from the reply", index)
			}
			if diff := cmp.Diff([]request{tt.want}, k.got()); diff != "" {
				t.Errorf("requests (-want +got):\n%s", diff)
			}
		})
	}
}

func TestConnectKernelErrors(t *testing.T) {
	sock, _ := socketFile(t)
	tests := []struct {
		errno unix.Errno
		want  []error
	}{
		{unix.EBUSY, []error{ErrBusy, unix.EBUSY}},
		{unix.EEXIST, []error{ErrBusy}},
		{unix.EINVAL, []error{ErrInvalid, unix.EINVAL}},
		{unix.EBADF, []error{ErrInvalid}},
		{unix.ENOTSOCK, []error{ErrInvalid}},
		{unix.EPERM, []error{os.ErrPermission, unix.EPERM}},
		{unix.ENODEV, []error{os.ErrNotExist}},
		{unix.ENOENT, []error{os.ErrNotExist}},
		{unix.ENOMEM, []error{unix.ENOMEM}},
	}
	for _, tt := range tests {
		t.Run(tt.errno.Error(), func(t *testing.T) {
			k := newFakeKernel(t)
			k.errnos[cmdConnect] = tt.errno
			c, _ := testClient(t, k.serve)

			_, err := c.Connect(ConnectConfig{Index: new(uint32(3)), Sockets: []syscall.Conn{sock}, Size: 1 << 20})
			for _, w := range tt.want {
				if !errors.Is(err, w) {
					t.Errorf("Connect error %v does not match %v", err, w)
				}
			}
			if !strings.HasPrefix(fmt.Sprint(err), "netlinknbd: connect nbd3: ") {
				t.Errorf("error %q lacks its context", err)
			}
			// Unrelated sentinels must not match.
			if tt.errno != unix.EBUSY && tt.errno != unix.EEXIST && errors.Is(err, ErrBusy) {
				t.Errorf("error %v unexpectedly matches ErrBusy", err)
			}
		})
	}
}

func TestConnectReplyWithoutIndex(t *testing.T) {
	sock, _ := socketFile(t)
	k := newFakeKernel(t)
	// No reply message at all, as when nbd_connect_reply cannot allocate
	// one: only the ack arrives, and Connect must not wait for more.
	c, _ := testClient(t, k.serve)
	_, err := c.Connect(ConnectConfig{Sockets: []syscall.Conn{sock}, Size: 1 << 20})
	if !errors.Is(err, errNoIndex) {
		t.Fatalf("Connect = %v, want errNoIndex", err)
	}
}

func TestConnectRejectsBeforeSending(t *testing.T) {
	k := newFakeKernel(t)
	c, _ := testClient(t, k.serve)
	for _, tt := range invalidConnects {
		cfg := validConnect
		tt.modify(&cfg)
		if _, err := c.Connect(cfg); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: Connect = %v, want ErrInvalid", tt.name, err)
		}
	}

	closed, _ := socketFile(t)
	_ = closed.Close()
	if _, err := c.Connect(ConnectConfig{Sockets: []syscall.Conn{closed}, Size: 1 << 20}); !errors.Is(err, ErrInvalid) {
		t.Errorf("closed socket: Connect = %v, want ErrInvalid", err)
	}
	if got := k.got(); len(got) != 0 {
		t.Errorf("invalid configs reached the kernel: %+v", got)
	}
}

func TestDisconnectRequest(t *testing.T) {
	k := newFakeKernel(t)
	c, _ := testClient(t, genltest.CheckRequest(testFamily.ID, cmdDisconnect, ackFlags, k.serve))
	if err := c.Disconnect(4); err != nil {
		t.Fatalf("Disconnect: %v", err)
	}
	want := []request{{Command: cmdDisconnect, Version: familyVersion, Flags: ackFlags, Index: new(uint32(4))}}
	if diff := cmp.Diff(want, k.got()); diff != "" {
		t.Errorf("requests (-want +got):\n%s", diff)
	}
}

func TestDisconnectErrors(t *testing.T) {
	tests := []struct {
		name    string
		errno   unix.Errno
		devices []DeviceStatus // what a follow-up STATUS finds
		want    []error
		notWant []error
	}{
		{
			name:    "unknown index",
			errno:   unix.EINVAL,
			want:    []error{os.ErrNotExist, ErrInvalid, unix.EINVAL},
			notWant: []error{ErrNotConnected},
		},
		{
			name:    "device going down",
			errno:   unix.EINVAL,
			devices: []DeviceStatus{{Index: 9, Connected: true}},
			want:    []error{ErrInvalid, unix.EINVAL},
			notWant: []error{os.ErrNotExist},
		},
		{
			name:    "not permitted",
			errno:   unix.EPERM,
			want:    []error{os.ErrPermission},
			notWant: []error{ErrInvalid},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := newFakeKernel(t)
			k.errnos[cmdDisconnect] = tt.errno
			k.replies[cmdStatus] = []genetlink.Message{statusMessage(tt.devices...)}
			c, _ := testClient(t, k.serve)

			err := c.Disconnect(9)
			for _, w := range tt.want {
				if !errors.Is(err, w) {
					t.Errorf("Disconnect error %v does not match %v", err, w)
				}
			}
			for _, w := range tt.notWant {
				if errors.Is(err, w) {
					t.Errorf("Disconnect error %v unexpectedly matches %v", err, w)
				}
			}
		})
	}
}

func TestReconfigureRequest(t *testing.T) {
	s1, fd1 := socketFile(t)
	tests := []struct {
		name string
		cfg  ReconfigureConfig
		want request
	}{
		{
			name: "nothing set sends only the index",
			want: request{Command: cmdReconfigure, Version: familyVersion, Flags: ackFlags, Index: new(uint32(2))},
		},
		{
			name: "zero values behind pointers are sent",
			cfg: ReconfigureConfig{
				Timeout:         new(time.Duration(0)),
				DeadConnTimeout: new(time.Duration(0)),
				ClientFlags:     new(ClientFlags(0)),
			},
			want: request{
				Command: cmdReconfigure, Version: familyVersion, Flags: ackFlags, Index: new(uint32(2)),
				Timeout: new(uint64(0)), DeadConnTimeout: new(uint64(0)), ClientFlags: new(uint64(0)),
			},
		},
		{
			name: "everything set",
			cfg: ReconfigureConfig{
				Sockets:           []syscall.Conn{s1},
				Size:              new(uint64(2 << 30)),
				BlockSize:         new(uint64(512)),
				Timeout:           new(10 * time.Second),
				DeadConnTimeout:   new(100 * time.Millisecond),
				ClientFlags:       new(ClientFlagDisconnectOnClose),
				BackendIdentifier: "vm-42/disk0",
			},
			want: request{
				Command:         cmdReconfigure,
				Version:         familyVersion,
				Flags:           ackFlags,
				Index:           new(uint32(2)),
				Size:            new(uint64(2 << 30)),
				BlockSize:       new(uint64(512)),
				Timeout:         new(uint64(10)),
				DeadConnTimeout: new(uint64(1)),
				ClientFlags:     new(uint64(2)),
				Sockets:         []uint32{fd1},
				Backend:         new("vm-42/disk0"),
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := newFakeKernel(t)
			c, _ := testClient(t, genltest.CheckRequest(testFamily.ID, cmdReconfigure, ackFlags, k.serve))
			if err := c.Reconfigure(2, tt.cfg); err != nil {
				t.Fatalf("Reconfigure: %v", err)
			}
			if diff := cmp.Diff([]request{tt.want}, k.got()); diff != "" {
				t.Errorf("requests (-want +got):\n%s", diff)
			}
		})
	}
}

func TestReconfigureErrors(t *testing.T) {
	tests := []struct {
		name    string
		devices []DeviceStatus
		want    []error
		notWant []error
	}{
		{"unknown index", nil, []error{os.ErrNotExist, ErrInvalid}, []error{ErrNotConnected}},
		{"idle device", []DeviceStatus{{Index: 2}}, []error{ErrNotConnected, ErrInvalid}, []error{os.ErrNotExist}},
		{"connected device (e.g. wrong backend)", []DeviceStatus{{Index: 2, Connected: true}}, []error{ErrInvalid}, []error{os.ErrNotExist, ErrNotConnected}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := newFakeKernel(t)
			k.errnos[cmdReconfigure] = unix.EINVAL
			k.replies[cmdStatus] = []genetlink.Message{statusMessage(tt.devices...)}
			c, _ := testClient(t, k.serve)

			err := c.Reconfigure(2, ReconfigureConfig{})
			for _, w := range tt.want {
				if !errors.Is(err, w) {
					t.Errorf("Reconfigure error %v does not match %v", err, w)
				}
			}
			for _, w := range tt.notWant {
				if errors.Is(err, w) {
					t.Errorf("Reconfigure error %v unexpectedly matches %v", err, w)
				}
			}
		})
	}

	k := newFakeKernel(t)
	c, _ := testClient(t, k.serve)
	if err := c.Reconfigure(2, ReconfigureConfig{BlockSize: new(uint64(100))}); !errors.Is(err, ErrInvalid) {
		t.Errorf("bad block size: Reconfigure = %v, want ErrInvalid", err)
	}
	if got := k.got(); len(got) != 0 {
		t.Errorf("invalid config reached the kernel: %+v", got)
	}
}

func TestStatus(t *testing.T) {
	tests := []struct {
		name    string
		reply   []DeviceStatus
		want    DeviceStatus
		wantErr error
	}{
		{"connected", []DeviceStatus{{Index: 6, Connected: true}}, DeviceStatus{Index: 6, Connected: true}, nil},
		{"idle", []DeviceStatus{{Index: 6}}, DeviceStatus{Index: 6}, nil},
		// What the kernel sends for index 0xffffffff, which it reads as -1.
		{"whole list", []DeviceStatus{{Index: 0}, {Index: 6, Connected: true}, {Index: 7}}, DeviceStatus{Index: 6, Connected: true}, nil},
		// The kernel answers an unknown index with an empty list.
		{"unknown", nil, DeviceStatus{}, os.ErrNotExist},
		{"other device only", []DeviceStatus{{Index: 1}}, DeviceStatus{}, os.ErrNotExist},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := newFakeKernel(t)
			k.replies[cmdStatus] = []genetlink.Message{statusMessage(tt.reply...)}
			c, _ := testClient(t, genltest.CheckRequest(testFamily.ID, cmdStatus, ackFlags, k.serve))

			got, err := c.Status(6)
			if !errors.Is(err, tt.wantErr) || (err != nil) != (tt.wantErr != nil) {
				t.Fatalf("Status error = %v, want %v", err, tt.wantErr)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("status (-want +got):\n%s", diff)
			}
			wantReq := []request{{Command: cmdStatus, Version: familyVersion, Flags: ackFlags, Index: new(uint32(6))}}
			if diff := cmp.Diff(wantReq, k.got()); diff != "" {
				t.Errorf("requests (-want +got):\n%s", diff)
			}
		})
	}
}

func TestStatusAll(t *testing.T) {
	k := newFakeKernel(t)
	k.replies[cmdStatus] = []genetlink.Message{statusMessage(
		DeviceStatus{Index: 16, Connected: true},
		DeviceStatus{Index: 0},
		DeviceStatus{Index: 3, Connected: true},
		DeviceStatus{Index: 1},
	)}
	c, _ := testClient(t, genltest.CheckRequest(testFamily.ID, cmdStatus, ackFlags, k.serve))

	got, err := c.StatusAll()
	if err != nil {
		t.Fatalf("StatusAll: %v", err)
	}
	want := []DeviceStatus{{Index: 0}, {Index: 1}, {Index: 3, Connected: true}, {Index: 16, Connected: true}}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("devices (-want +got):\n%s", diff)
	}
	wantReq := []request{{Command: cmdStatus, Version: familyVersion, Flags: ackFlags}}
	if diff := cmp.Diff(wantReq, k.got()); diff != "" {
		t.Errorf("requests (-want +got):\n%s", diff)
	}
}

func TestStatusAllErrors(t *testing.T) {
	t.Run("no reply", func(t *testing.T) {
		c, _ := testClient(t, newFakeKernel(t).serve)
		if _, err := c.StatusAll(); err == nil {
			t.Fatal("StatusAll succeeded without a reply")
		}
	})
	t.Run("truncated device index", func(t *testing.T) {
		k := newFakeKernel(t)
		ae := netlink.NewAttributeEncoder()
		ae.Nested(attrDeviceList, func(lae *netlink.AttributeEncoder) error {
			lae.Nested(deviceItem, func(iae *netlink.AttributeEncoder) error {
				iae.Uint16(deviceIndex, 1)
				return nil
			})
			return nil
		})
		k.replies[cmdStatus] = []genetlink.Message{{Header: genetlink.Header{Command: cmdStatus}, Data: must(ae.Encode())}}
		c, _ := testClient(t, k.serve)
		if _, err := c.StatusAll(); err == nil {
			t.Fatal("StatusAll accepted a 2-byte device index")
		}
	})
}

// A reply or error left over from an abandoned exchange must not be taken
// for the answer to the next request.
func TestExecuteSkipsStaleMessages(t *testing.T) {
	k := newFakeKernel(t)
	k.replies[cmdStatus] = []genetlink.Message{statusMessage(DeviceStatus{Index: 1, Connected: true})}
	c, sock := testClient(t, k.serve)

	stale := netlink.Message{Header: netlink.Header{Type: netlink.HeaderType(testFamily.ID), Sequence: 9999, PID: 1}}
	stale.Data = must(statusMessage(DeviceStatus{Index: 1}).MarshalBinary())
	stale.Header.Length = uint32(16 + len(stale.Data))
	sock.push([]netlink.Message{stale})
	sock.push([]netlink.Message{ackMessage(stale, unix.EBUSY)})

	got, err := c.Status(1)
	if err != nil {
		t.Fatalf("Status: %v", err)
	}
	if !got.Connected {
		t.Errorf("Status took the stale reply: %+v", got)
	}
}

// Requests from many goroutines share one socket; each must get its own
// answer.
func TestConcurrentRequests(t *testing.T) {
	fn := func(greq genetlink.Message, nreq netlink.Message) ([]genetlink.Message, error) {
		r, err := decodeRequest(greq, nreq)
		if err != nil || r.Index == nil {
			return nil, unix.EINVAL
		}
		return []genetlink.Message{statusMessage(DeviceStatus{Index: *r.Index, Connected: *r.Index%2 == 0})}, nil
	}
	c, _ := testClient(t, fn)

	var wg sync.WaitGroup
	for i := range uint32(16) {
		wg.Go(func() {
			for range 50 {
				st, err := c.Status(i)
				if err != nil {
					t.Errorf("Status(%d): %v", i, err)
					return
				}
				if want := (DeviceStatus{Index: i, Connected: i%2 == 0}); st != want {
					t.Errorf("Status(%d) = %+v, want %+v", i, st, want)
					return
				}
			}
		})
	}
	wg.Wait()
}

func TestFamilyMissing(t *testing.T) {
	// Without ServeFamily the controller request gets ENOENT, as from a
	// kernel without the nbd module.
	sock := newFakeSocket(func(genetlink.Message, netlink.Message) ([]genetlink.Message, error) {
		return nil, unix.ENOENT
	})
	conn := genetlink.NewConn(netlink.NewConn(sock, 1))
	defer conn.Close()

	if _, err := initClient(conn); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("initClient = %v, want os.ErrNotExist", err)
	}
	if _, err := initWatcher(conn); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("initWatcher = %v, want os.ErrNotExist", err)
	}
}
