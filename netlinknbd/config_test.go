package netlinknbd

import (
	"errors"
	"math"
	"syscall"
	"testing"
	"time"
)

// nopConn is a syscall.Conn for validation tests, which never look inside.
type nopConn struct{}

func (nopConn) SyscallConn() (syscall.RawConn, error) {
	return nil, errors.New("nopConn has no descriptor")
}

var validConnect = ConnectConfig{Sockets: []syscall.Conn{nopConn{}}, Size: 1 << 20}

// invalidConnects are rejected before anything reaches the kernel.
var invalidConnects = []struct {
	name   string
	modify func(*ConnectConfig)
}{
	{"no sockets", func(c *ConnectConfig) { c.Sockets = nil }},
	{"nil socket", func(c *ConnectConfig) {
		c.Sockets = []syscall.Conn{nopConn{}, nil}
		c.ServerFlags = serverFlagCanMultiConn
	}},
	{"two sockets without multi-conn", func(c *ConnectConfig) { c.Sockets = []syscall.Conn{nopConn{}, nopConn{}} }},
	{"zero size", func(c *ConnectConfig) { c.Size = 0 }},
	{"size beyond loff_t", func(c *ConnectConfig) { c.Size = math.MaxInt64 + 1 }},
	{"block size below 512", func(c *ConnectConfig) { c.BlockSize = 256 }},
	{"block size not a power of two", func(c *ConnectConfig) { c.BlockSize = 1000 }},
	{"block size above 64KiB", func(c *ConnectConfig) { c.BlockSize = 128 << 10 }},
	{"negative timeout", func(c *ConnectConfig) { c.Timeout = -time.Second }},
	{"negative dead connection timeout", func(c *ConnectConfig) { c.DeadConnTimeout = -time.Second }},
	{"NUL in backend identifier", func(c *ConnectConfig) { c.BackendIdentifier = "a\x00b" }},
	{"index beyond MINORMASK", func(c *ConnectConfig) { c.Index = new(uint32(1 << 20)) }},
}

func TestConnectConfigValidate(t *testing.T) {
	if err := validConnect.validate(); err != nil {
		t.Fatalf("valid config rejected: %v", err)
	}
	for _, bs := range []uint64{512, 1024, 4096, 65536} {
		cfg := validConnect
		cfg.BlockSize = bs
		if err := cfg.validate(); err != nil {
			t.Errorf("block size %d rejected: %v", bs, err)
		}
	}
	multi := validConnect
	multi.Sockets = []syscall.Conn{nopConn{}, nopConn{}}
	multi.ServerFlags = serverFlagCanMultiConn
	if err := multi.validate(); err != nil {
		t.Errorf("two sockets with multi-conn rejected: %v", err)
	}

	for _, tt := range invalidConnects {
		t.Run(tt.name, func(t *testing.T) {
			cfg := validConnect
			tt.modify(&cfg)
			err := cfg.validate()
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("validate() = %v, want an error matching ErrInvalid", err)
			}
		})
	}
}

func TestReconfigureConfigValidate(t *testing.T) {
	if err := (&ReconfigureConfig{}).validate(); err != nil {
		t.Fatalf("empty config rejected: %v", err)
	}
	tests := []struct {
		name string
		cfg  ReconfigureConfig
	}{
		{"nil socket", ReconfigureConfig{Sockets: []syscall.Conn{nil}}},
		{"zero size", ReconfigureConfig{Size: new(uint64(0))}},
		{"zero block size", ReconfigureConfig{BlockSize: new(uint64(0))}},
		{"odd block size", ReconfigureConfig{BlockSize: new(uint64(3000))}},
		{"negative timeout", ReconfigureConfig{Timeout: new(-time.Second)}},
		{"negative dead connection timeout", ReconfigureConfig{DeadConnTimeout: new(-time.Minute)}},
		{"NUL in backend identifier", ReconfigureConfig{BackendIdentifier: "\x00"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.cfg.validate(); !errors.Is(err, ErrInvalid) {
				t.Fatalf("validate() = %v, want an error matching ErrInvalid", err)
			}
		})
	}
}

func TestSeconds(t *testing.T) {
	tests := []struct {
		in   time.Duration
		want uint64
	}{
		{0, 0},
		{time.Nanosecond, 1},
		{time.Second, 1},
		{1500 * time.Millisecond, 2},
		{30 * time.Second, 30},
		{time.Hour, 3600},
	}
	for _, tt := range tests {
		if got := seconds(tt.in); got != tt.want {
			t.Errorf("seconds(%v) = %d, want %d", tt.in, got, tt.want)
		}
	}
}
