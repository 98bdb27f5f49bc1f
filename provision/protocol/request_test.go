package protocol

import (
	"encoding/binary"
	"errors"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestParseRequest(t *testing.T) {
	withLength := func(key string, n uint32) []byte {
		b := AppendRequest(nil, CommandAttach, key)
		binary.LittleEndian.PutUint32(b[5:], n)
		return b
	}
	tests := []struct {
		name string
		msg  []byte
		want Request
		err  error
	}{
		{name: "valid", msg: AppendRequest(nil, 1, "my-image_1.v2"), want: Request{Command: 1, Key: "my-image_1.v2"}},
		{name: "key from byte 9", msg: []byte{0x57, 0xa7, 0xe9, 0x6a, 1, 3, 0, 0, 0, 'a', 'b', 'c'}, want: Request{Command: 1, Key: "abc"}},
		{name: "longest key", msg: AppendRequest(nil, 1, strings.Repeat("k", 253)), want: Request{Command: 1, Key: strings.Repeat("k", 253)}},
		{name: "empty message", msg: nil, err: ErrBadRequest},
		{name: "short header", msg: AppendRequest(nil, 1, "")[:8], err: ErrBadRequest},
		{name: "bad magic", msg: append([]byte{0x6a, 0xe9, 0xa7, 0x57}, AppendRequest(nil, 1, "k")[4:]...), err: ErrBadRequest},
		{name: "length says more", msg: withLength("key", 4), err: ErrBadRequest},
		{name: "length says less", msg: withLength("key", 2), err: ErrBadRequest},
		{name: "length overflows", msg: withLength("key", 0xffffffff), err: ErrBadRequest},
		{name: "unknown command", msg: AppendRequest(nil, 2, "key"), err: ErrUnknownCommand},
		{name: "command zero", msg: AppendRequest(nil, 0, "key"), err: ErrUnknownCommand},
		{name: "empty key", msg: AppendRequest(nil, 1, ""), err: ErrBadRequest},
		{name: "key too long", msg: AppendRequest(nil, 1, strings.Repeat("k", 254)), err: ErrBadRequest},
		{name: "dot dot", msg: AppendRequest(nil, 1, ".."), err: ErrBadRequest},
		{name: "hidden", msg: AppendRequest(nil, 1, ".data"), err: ErrBadRequest},
		{name: "configmap data link", msg: AppendRequest(nil, 1, "..data"), err: ErrBadRequest},
		{name: "slash", msg: AppendRequest(nil, 1, "a/b"), err: ErrBadRequest},
		{name: "traversal", msg: AppendRequest(nil, 1, "../../etc/passwd"), err: ErrBadRequest},
		{name: "nul", msg: AppendRequest(nil, 1, "a\x00b"), err: ErrBadRequest},
		{name: "space", msg: AppendRequest(nil, 1, "a b"), err: ErrBadRequest},
		{name: "utf-8", msg: AppendRequest(nil, 1, "imäge"), err: ErrBadRequest},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseRequest(tt.msg)
			if tt.err != nil {
				if !errors.Is(err, tt.err) {
					t.Fatalf("err = %v, want %v", err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseRequest: %v", err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Fatalf("request (-want +got):\n%s", diff)
			}
		})
	}
}

func TestReplies(t *testing.T) {
	if err := ParseReply([]byte("OK")); err != nil {
		t.Fatalf("OK: %v", err)
	}
	payload := (&ReplyError{Code: CodeBusy, Message: "image x.mvps-image is attached\nelsewhere"}).Payload()
	if got, want := string(payload), "ERR busy image x.mvps-image is attached elsewhere"; got != want {
		t.Fatalf("payload %q, want %q", got, want)
	}
	err := ParseReply(payload)
	var rerr *ReplyError
	if !errors.As(err, &rerr) || rerr.Code != CodeBusy || rerr.Message != "image x.mvps-image is attached elsewhere" {
		t.Fatalf("ParseReply = %#v", err)
	}
	if len((&ReplyError{Code: CodeInternal, Message: strings.Repeat("x", 4096)}).Payload()) > maxReplySize {
		t.Fatal("payload not bounded")
	}
	if err := ParseReply([]byte("HELLO")); err == nil || errors.As(err, &rerr) {
		t.Fatalf("malformed reply: %v", err)
	}
}
