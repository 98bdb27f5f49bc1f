package devengine_test

import (
	"bytes"
	"encoding/binary"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/internal/devengine"
	"github.com/mvps-provisioner/mvps-provisioner/internal/devengine/devenginetest"
	"github.com/mvps-provisioner/mvps-provisioner/internal/logbuf"
	"github.com/mvps-provisioner/mvps-provisioner/internal/testwait"
	"github.com/mvps-provisioner/mvps-provisioner/nbd"
)

// attached returns a client in transmission on a fresh image of size bytes.
func attached(t *testing.T, e *devenginetest.Engine, image string, size uint64) *client {
	t.Helper()
	c := dial(t, e)
	c.handshake(e.Token(devenginetest.Claims{ImageID: image, ImageSize: size, PageSizeBits: 12}), size)
	return c
}

func randomBytes(seed uint64, n int) []byte {
	var key [32]byte
	binary.LittleEndian.PutUint64(key[:], seed)
	b := make([]byte, n)
	rand.NewChaCha8(key).Read(b)
	return b
}

func TestReadWrite(t *testing.T) {
	e := devenginetest.New(t)
	const size = 1 << 20
	c := attached(t, e, "rw.mvps-image", size)

	c.readAt(1, 0, make([]byte, 4096)) // a new image reads as zeros
	page := randomBytes(1, 4096)
	c.write(2, 8192, page)
	c.readAt(3, 8192, page)
	// Unaligned, across a page boundary, and odd lengths.
	odd := randomBytes(2, 5001)
	c.write(4, 4096*3-7, odd)
	c.readAt(5, 4096*3-7, odd)
	c.readAt(6, 4096*3-7+100, odd[100:101])
	// The last byte of the image.
	c.write(7, size-1, []byte{0xab})
	c.readAt(8, size-2, []byte{0, 0xab})
	// Zero-length requests, at the very end too.
	c.request(nbd.CmdWrite, 9, size, 0, nil)
	c.expectReply("zero-length WRITE at the end", 9, 0, nil)
	c.request(nbd.CmdRead, 10, size, 0, nil)
	c.expectReply("zero-length READ at the end", 10, 0, nil)
	// Request flags (FUA and the like) are ignored.
	hdr := requestBytes(nbd.CmdRead, 11, 8192, 16)
	binary.BigEndian.PutUint16(hdr[4:], 0xffff)
	c.send(hdr)
	c.expectReply("READ with all flags set", 11, 0, page[:16])

	// The image is a file named by the image id, of the image's size.
	want := make([]byte, size)
	copy(want[8192:], page)
	copy(want[4096*3-7:], odd)
	want[size-1] = 0xab
	got := readImage(t, e.ImageDir, "rw.mvps-image")
	if !bytes.Equal(got, want) {
		t.Fatalf("image file differs from what was written (len %d, want %d)", len(got), len(want))
	}
}

// Requests are served concurrently; the client matches replies by handle.
func TestPipelinedOutOfOrder(t *testing.T) {
	e := devenginetest.New(t)
	const size = 16 << 20
	c := attached(t, e, "pipeline.mvps-image", size)
	big := randomBytes(3, devengine.MaxRequestLength)
	c.write(1, 0, big)

	// One 8 MiB read, then many small ones: the small ones may well be
	// answered first.
	type req struct {
		handle uint64
		off    uint64
		n      uint32
	}
	reqs := []req{{100, 0, devengine.MaxRequestLength}}
	for i := range 64 {
		reqs = append(reqs, req{uint64(200 + i), uint64(i * 4099), uint32(1 + i*13)})
	}
	sent := make(chan error, 1)
	go func() {
		var out []byte
		for _, r := range reqs {
			out = append(out, requestBytes(nbd.CmdRead, r.handle, r.off, r.n)...)
		}
		_, err := c.conn.Write(out)
		sent <- err
	}()
	byHandle := map[uint64]req{}
	for _, r := range reqs {
		byHandle[r.handle] = r
	}
	var order []uint64
	for range reqs {
		h := c.read("reply", nbd.SimpleReplySize)
		rep, err := nbd.ParseSimpleReply(h)
		if err != nil || rep.Error != 0 {
			t.Fatalf("reply %x: %v, error %d", h, err, rep.Error)
		}
		r, ok := byHandle[rep.Handle]
		if !ok {
			t.Fatalf("reply for unknown or repeated handle %d", rep.Handle)
		}
		delete(byHandle, rep.Handle)
		data := c.read("data", int(r.n))
		if !bytes.Equal(data, big[r.off:r.off+uint64(r.n)]) {
			t.Fatalf("READ handle %d: wrong data", r.handle)
		}
		order = append(order, rep.Handle)
	}
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	t.Logf("the 8 MiB read was answered as reply %d of %d", indexOf(order, 100)+1, len(order))
}

func indexOf(s []uint64, v uint64) int {
	for i, x := range s {
		if x == v {
			return i
		}
	}
	return -1
}

// mvps-te serves requests of at most 8 MiB from 0.1.4 on, 1 MiB before.
func TestRequestLengthLimit(t *testing.T) {
	for _, release := range []struct {
		name  string
		limit uint32 // Config.MaxRequestLength; 0 for the default
		max   uint32
	}{
		{"0.1.4", 0, devengine.MaxRequestLength},
		{"0.1.3", devengine.EarlyMaxRequestLength, devengine.EarlyMaxRequestLength},
	} {
		t.Run(release.name, func(t *testing.T) {
			e := devenginetest.New(t, func(c *devengine.Config) { c.MaxRequestLength = release.limit })
			const size = 16 << 20
			t.Run("the limit's WRITE and READ served", func(t *testing.T) {
				c := attached(t, e, "limit.mvps-image", size)
				data := randomBytes(4, int(release.max))
				c.write(1, 4096, data)
				c.readAt(2, 4096, data)
			})
			t.Run("READ of the limit + 1 closes", func(t *testing.T) {
				c := attached(t, e, "limit.mvps-image", size)
				c.request(nbd.CmdRead, 3, 0, release.max+1, nil)
				c.expectClosed("after a READ of the limit + 1")
			})
			t.Run("WRITE of the limit + 1 closes", func(t *testing.T) {
				c := attached(t, e, "limit.mvps-image", size)
				c.request(nbd.CmdWrite, 4, 0, release.max+1, nil)
				c.expectClosed("after a WRITE header of the limit + 1")
			})
			t.Run("READ of 4 GiB - 1 closes", func(t *testing.T) {
				c := attached(t, e, "limit.mvps-image", size)
				c.request(nbd.CmdRead, 5, 0, 0xffffffff, nil)
				c.expectClosed("after a READ of 4 GiB - 1")
			})
		})
	}
}

// Every command but READ and WRITE ends the connection without a reply,
// and so do framing errors.
func TestClosingRequests(t *testing.T) {
	e := devenginetest.New(t)
	tests := []struct {
		name string
		req  []byte
	}{
		{"DISC", requestBytes(nbd.CmdDisc, 1, 0, 0)},
		{"FLUSH", requestBytes(nbd.CmdFlush, 1, 0, 0)},
		{"TRIM", requestBytes(nbd.CmdTrim, 1, 0, 4096)},
		{"CACHE", requestBytes(nbd.CmdCache, 1, 0, 4096)},
		{"WRITE_ZEROES", requestBytes(nbd.CmdWriteZeroes, 1, 0, 4096)},
		{"BLOCK_STATUS", requestBytes(nbd.CmdBlockStatus, 1, 0, 4096)},
		{"RESIZE", requestBytes(nbd.CmdResize, 1, 0, 0)},
		{"MVPS_BEGIN_TXN (64)", requestBytes(64, 1, 0, 0)},
		{"MVPS_COMMIT_TXN (65)", requestBytes(65, 1, 0, 0)},
		{"MVPS_ROLLBACK_TXN (66)", requestBytes(66, 1, 0, 0)},
		{"MVPS_LOCK_TXN (67)", requestBytes(67, 1, 0, 0)},
		{"unknown 0xffff", requestBytes(0xffff, 1, 0, 0)},
		{"bad magic", append(unhexMust("25609514"), requestBytes(nbd.CmdRead, 1, 0, 512)[4:]...)},
		{"structured reply magic", append(unhexMust("668e33ef"), requestBytes(nbd.CmdRead, 1, 0, 512)[4:]...)},
		{"offset+length overflows", requestBytes(nbd.CmdRead, 1, 0xffffffffffffff00, 0x200)},
		{"WRITE offset+length overflows", requestBytes(nbd.CmdWrite, 1, 0xfffffffffffffff0, 0x20)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := attached(t, e, "closing.mvps-image", 1<<20)
			c.readAt(100, 0, make([]byte, 8)) // serving
			c.send(tt.req)
			c.expectClosed("after " + tt.name)
		})
	}
}

// DISC after requests in flight: their replies still go out first.
func TestDiscAfterPipelinedRequests(t *testing.T) {
	e := devenginetest.New(t)
	c := attached(t, e, "disc.mvps-image", 1<<20)
	data := randomBytes(5, 4096)
	var out []byte
	out = append(out, requestBytes(nbd.CmdWrite, 1, 0, 4096)...)
	out = append(out, data...)
	out = append(out, requestBytes(nbd.CmdDisc, 2, 0, 0)...)
	c.send(out)
	c.expectReply("WRITE before DISC", 1, 0, nil)
	c.expectClosed("after DISC")
}

func TestOutOfRange(t *testing.T) {
	e := devenginetest.New(t)
	const size = 1 << 20
	c := attached(t, e, "range.mvps-image", size)
	tests := []struct {
		name   string
		cmd    nbd.Command
		off    uint64
		n      uint32
		errno  nbd.Errno
		errHex string
	}{
		{"READ across the end", nbd.CmdRead, size - 512, 1024, nbd.EINVAL, "00000016"},
		{"READ past the end", nbd.CmdRead, size, 1, nbd.EINVAL, "00000016"},
		{"READ far past the end", nbd.CmdRead, 1 << 40, 4096, nbd.EINVAL, "00000016"},
		{"zero-length READ past the end", nbd.CmdRead, size + 1, 0, nbd.EINVAL, "00000016"},
		{"WRITE across the end", nbd.CmdWrite, size - 512, 1024, nbd.ENOSPC, "0000001c"},
		{"WRITE past the end", nbd.CmdWrite, size, 4096, nbd.ENOSPC, "0000001c"},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			handle := uint64(1000 + i)
			var payload []byte
			if tt.cmd == nbd.CmdWrite {
				payload = bytes.Repeat([]byte{0xee}, int(tt.n))
			}
			c.request(tt.cmd, handle, tt.off, tt.n, payload)
			// The error reply carries no data, even for READ.
			c.expectHex("error reply", hexRepSimpl+tt.errHex+be64(handle))
			// The connection goes on.
			c.readAt(handle+100, size-4, make([]byte, 4))
		})
	}
	if got := readImage(t, e.ImageDir, "range.mvps-image"); int64(len(got)) != size || bytes.IndexByte(got, 0xee) >= 0 {
		t.Fatalf("an out-of-range write changed the image (len %d)", len(got))
	}
}

// Bytes sent to a closed or refused connection are irrelevant; what matters
// is that a client reading gets exactly what the engine sent. This checks
// the reply stream of a long random session against a model.
func TestRandomSessionAgainstModel(t *testing.T) {
	e := devenginetest.New(t)
	const size = 256 << 10
	c := attached(t, e, "model.mvps-image", size)
	model := make([]byte, size)
	r := rand.New(rand.NewPCG(7, 7))
	for i := range 300 {
		off := r.Uint64N(size)
		n := r.Uint64N(min(size-off, 20000) + 1)
		if r.IntN(2) == 0 {
			data := randomBytes(uint64(i), int(n))
			copy(model[off:], data)
			c.write(uint64(i), off, data)
		} else {
			c.readAt(uint64(i), off, model[off:off+n])
		}
	}
	if !bytes.Equal(model, readImage(t, e.ImageDir, "model.mvps-image")) {
		t.Fatal("image file differs from the model")
	}
}

func readImage(t *testing.T, dir, id string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, id))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// The line that ends a connection counts the READ and WRITE requests it
// served and their bytes: what a benchmark reads to tell how much an attach
// asked of the engine.
func TestConnectionCountsItsRequests(t *testing.T) {
	var logs logbuf.Buffer
	cfg := devengine.Config{Secret: []byte("count secret"), ImageDir: t.TempDir(),
		Logger: slog.New(slog.NewTextHandler(&logs, nil))}
	_, d, _ := start(t, cfg)
	c := dial(t, d)
	c.handshake(devenginetest.Sign(cfg.Secret, map[string]any{
		"image_id": "count.mvps-image", "image_size": 1 << 20, "page_size_bits": 12, "exp": time.Now().Add(time.Hour).Unix(),
	}), 1<<20)
	c.readAt(1, 0, make([]byte, 4096))
	c.write(2, 4096, randomBytes(3, 8192))
	c.readAt(3, 1<<20-512, make([]byte, 512))
	c.request(nbd.CmdRead, 4, 1<<20, 4096, nil) // past the end: answered, and counted
	c.expectReply("READ past the end", 4, nbd.EINVAL, nil)
	c.conn.Close()

	var line string
	testwait.Until(t, 10*time.Second, "the connection's last line", func() bool {
		for l := range strings.SplitSeq(logs.String(), "\n") {
			if strings.Contains(l, `msg="connection closed"`) {
				line = l
				return true
			}
		}
		return false
	})
	for _, want := range []string{"image_id=count.mvps-image ", "reads=3 ", "read_bytes=8704 ", "writes=1 ", "write_bytes=8192"} {
		if !strings.Contains(line+" ", want) {
			t.Errorf("the last line lacks %q: %s", want, line)
		}
	}
}
