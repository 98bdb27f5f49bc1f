package nbd_test

import (
	"encoding/hex"
	"errors"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/mvps-provisioner/mvps-provisioner/nbd"
)

func mustHex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// The byte strings are written out by hand from the NBD protocol document
// so that an encoder and decoder that agree with each other but not with
// the protocol still fail.
func TestWireFormat(t *testing.T) {
	tests := []struct {
		name   string
		encode func([]byte) []byte
		decode func([]byte) (any, error)
		value  any
		wire   string
	}{
		{
			name:   "greeting",
			encode: nbd.Greeting{Flags: nbd.FlagFixedNewstyle | nbd.FlagNoZeroes}.Append,
			decode: func(b []byte) (any, error) { return nbd.ParseGreeting(b) },
			value:  nbd.Greeting{Flags: 3},
			wire:   "4e42444d41474943" + "49484156454f5054" + "0003",
		},
		{
			name:   "client flags",
			encode: func(b []byte) []byte { return nbd.AppendClientFlags(b, 3) },
			decode: func(b []byte) (any, error) { return nbd.ParseClientFlags(b) },
			value:  nbd.ClientFlags(3),
			wire:   "00000003",
		},
		{
			name:   "option header",
			encode: nbd.OptionHeader{Option: nbd.OptExportName, Length: 0x1234}.Append,
			decode: func(b []byte) (any, error) { return nbd.ParseOptionHeader(b) },
			value:  nbd.OptionHeader{Option: nbd.OptExportName, Length: 0x1234},
			wire:   "49484156454f5054" + "00000001" + "00001234",
		},
		{
			name:   "option reply",
			encode: nbd.OptionReplyHeader{Option: nbd.OptGo, Type: nbd.RepErrUnsup}.Append,
			decode: func(b []byte) (any, error) { return nbd.ParseOptionReplyHeader(b) },
			value:  nbd.OptionReplyHeader{Option: nbd.OptGo, Type: nbd.RepErrUnsup},
			wire:   "0003e889045565a9" + "00000007" + "80000001" + "00000000",
		},
		{
			name:   "export info",
			encode: nbd.ExportInfo{Size: 1 << 30, Flags: nbd.FlagHasFlags}.Append,
			decode: func(b []byte) (any, error) { return nbd.ParseExportInfo(b) },
			value:  nbd.ExportInfo{Size: 1 << 30, Flags: nbd.FlagHasFlags},
			wire:   "0000000040000000" + "0001",
		},
		{
			name: "request",
			encode: nbd.Request{
				Flags: nbd.CmdFlagFUA, Type: nbd.CmdWrite, Handle: 0x0102030405060708,
				Offset: 0x1000, Length: 0x200,
			}.Append,
			decode: func(b []byte) (any, error) { return nbd.ParseRequest(b) },
			value: nbd.Request{
				Flags: nbd.CmdFlagFUA, Type: nbd.CmdWrite, Handle: 0x0102030405060708,
				Offset: 0x1000, Length: 0x200,
			},
			wire: "25609513" + "0001" + "0001" + "0102030405060708" + "0000000000001000" + "00000200",
		},
		{
			name:   "simple reply",
			encode: nbd.SimpleReply{Error: nbd.EINVAL, Handle: 42}.Append,
			decode: func(b []byte) (any, error) { return nbd.ParseSimpleReply(b) },
			value:  nbd.SimpleReply{Error: nbd.EINVAL, Handle: 42},
			wire:   "67446698" + "00000016" + "000000000000002a",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			want := mustHex(t, tt.wire)
			prefix := []byte("xy")
			got := tt.encode(prefix)
			if diff := cmp.Diff(append([]byte("xy"), want...), got); diff != "" {
				t.Fatalf("encoding (-want +got):\n%s", diff)
			}
			v, err := tt.decode(want)
			if err != nil {
				t.Fatalf("decode: %v", err)
			}
			if diff := cmp.Diff(tt.value, v); diff != "" {
				t.Fatalf("decoding (-want +got):\n%s", diff)
			}
			if _, err := tt.decode(want[:len(want)-1]); !errors.Is(err, nbd.ErrShortMessage) {
				t.Fatalf("decoding a truncated message: err = %v, want ErrShortMessage", err)
			}
		})
	}
}

func TestBadMagic(t *testing.T) {
	tests := []struct {
		name   string
		decode func([]byte) error
		wire   string
	}{
		{"greeting oldstyle", func(b []byte) error { _, err := nbd.ParseGreeting(b); return err },
			"4e42444d41474943" + "0000420281861253" + "0003"},
		{"greeting garbage", func(b []byte) error { _, err := nbd.ParseGreeting(b); return err },
			"485454502f312e31" + "49484156454f5054" + "0003"},
		{"option", func(b []byte) error { _, err := nbd.ParseOptionHeader(b); return err },
			"49484156454f5055" + "00000001" + "00000000"},
		{"option reply", func(b []byte) error { _, err := nbd.ParseOptionReplyHeader(b); return err },
			"0003e889045565aa" + "00000007" + "80000001" + "00000000"},
		{"request", func(b []byte) error { _, err := nbd.ParseRequest(b); return err },
			"25609514" + "0000" + "0000" + "0000000000000000" + "0000000000000000" + "00000000"},
		{"reply", func(b []byte) error { _, err := nbd.ParseSimpleReply(b); return err },
			"668e33ef" + "00000000" + "0000000000000000"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.decode(mustHex(t, tt.wire)); !errors.Is(err, nbd.ErrBadMagic) {
				t.Fatalf("err = %v, want ErrBadMagic", err)
			}
		})
	}
}

func TestNoAllocations(t *testing.T) {
	buf := make([]byte, 0, 64)
	req := nbd.Request{Type: nbd.CmdRead, Handle: 7, Offset: 4096, Length: 4096}
	allocs := testing.AllocsPerRun(100, func() {
		b := req.Append(buf[:0])
		if _, err := nbd.ParseRequest(b); err != nil {
			panic(err)
		}
		b = nbd.SimpleReply{Handle: 7}.Append(buf[:0])
		if _, err := nbd.ParseSimpleReply(b); err != nil {
			panic(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("request/reply round trip allocates %v times, want 0", allocs)
	}
}

func TestStrings(t *testing.T) {
	tests := []struct{ got, want string }{
		{nbd.OptGo.String(), "NBD_OPT_GO"},
		{nbd.Option(99).String(), "NBD_OPT(99)"},
		{nbd.RepErrUnsup.String(), "NBD_REP_ERR_UNSUP"},
		{nbd.CmdLockTxn.String(), "NBD_CMD_MVPS_LOCK_TXN"},
		{nbd.Command(9).String(), "NBD_CMD(9)"},
		{(nbd.FlagHasFlags | nbd.FlagSendFlush | 1<<15).String(), "HAS_FLAGS|SEND_FLUSH|0x8000"},
		{nbd.EINVAL.Error(), "nbd: server error EINVAL"},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("got %q, want %q", tt.got, tt.want)
		}
	}
	if !nbd.RepErrUnsup.IsError() || nbd.RepAck.IsError() {
		t.Error("IsError is wrong")
	}
}

func BenchmarkRequestRoundTrip(b *testing.B) {
	buf := make([]byte, 0, 64)
	req := nbd.Request{Type: nbd.CmdWrite, Handle: 7, Offset: 4096, Length: 4096}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := nbd.ParseRequest(req.Append(buf[:0])); err != nil {
			b.Fatal(err)
		}
	}
}
