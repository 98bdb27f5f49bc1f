package provision

import (
	"bytes"
	"errors"
	"testing"
)

// FuzzParseRequest checks that no message panics, that every refusal
// carries a caller-facing code, and that what is accepted is exactly the
// encoding of the request it decodes to.
func FuzzParseRequest(f *testing.F) {
	f.Add(AppendRequest(nil, CommandMount, "vol"))
	f.Add(AppendRequest(nil, 0x02, "vol"))
	f.Add(AppendRequest(nil, CommandMount, "..data"))
	f.Fuzz(func(t *testing.T, msg []byte) {
		req, err := ParseRequest(msg)
		if err != nil {
			var rerr *ReplyError
			if !errors.As(err, &rerr) || (rerr.Code != CodeBadRequest && rerr.Code != CodeUnknownCommand) {
				t.Fatalf("%q: error %v has no request code", msg, err)
			}
			if len(rerr.Payload()) > 512 {
				t.Fatalf("%q: reply is %d bytes", msg, len(rerr.Payload()))
			}
			return
		}
		if ValidateKey(req.Key) != nil || req.Command != CommandMount {
			t.Fatalf("%q accepted as %+v", msg, req)
		}
		if enc := AppendRequest(nil, req.Command, req.Key); !bytes.Equal(enc, msg) {
			t.Fatalf("%q decoded to %+v, which encodes as %q", msg, req, enc)
		}
	})
}
