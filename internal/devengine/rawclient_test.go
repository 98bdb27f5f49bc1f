package devengine_test

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/mvps-provisioner/mvps-provisioner/nbd"
)

// The expected bytes are written out by hand from the NBD protocol and
// mvps-te's source rather than built with package nbd, so that an encoder
// bug shared by the engine and its tests still fails.
const (
	hexGreeting = "4e42444d41474943" + "49484156454f5054" + "0003" // NBDMAGIC IHAVEOPT FIXED_NEWSTYLE|NO_ZEROES
	hexIHAVEOPT = "49484156454f5054"
	hexRepMagic = "0003e889045565a9"
	hexReqMagic = "25609513"
	hexRepSimpl = "67446698"
)

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func be32(v uint32) string { return fmt.Sprintf("%08x", v) }
func be64(v uint64) string { return fmt.Sprintf("%016x", v) }

// optionHex is an option as the client sends it.
func optionHex(opt uint32, data []byte) string {
	return hexIHAVEOPT + be32(opt) + be32(uint32(len(data))) + hex.EncodeToString(data)
}

// optionReplyHex is a reply without data, as mvps-te sends for ABORT (ACK)
// and every unsupported option (ERR_UNSUP).
func optionReplyHex(opt, typ uint32) string {
	return hexRepMagic + be32(opt) + be32(typ) + be32(0)
}

func exportInfoHex(size uint64) string { return be64(size) + "0001" }

// client is a raw NBD client: the test says which bytes go out and which
// must come back.
type client struct {
	t    testing.TB
	conn net.Conn
}

// dialer is a devenginetest.Engine or a unixDialer.
type dialer interface {
	Dial(ctx context.Context) (net.Conn, error)
}

type unixDialer string

func (d unixDialer) Dial(ctx context.Context) (net.Conn, error) {
	var nd net.Dialer
	return nd.DialContext(ctx, "unix", string(d))
}

func dial(t testing.TB, e dialer) *client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := e.Dial(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// A hang fails the test instead of the whole run.
	conn.SetDeadline(time.Now().Add(20 * time.Second))
	t.Cleanup(func() { conn.Close() })
	return &client{t: t, conn: conn}
}

func (c *client) send(b []byte) {
	c.t.Helper()
	if _, err := c.conn.Write(b); err != nil {
		c.t.Fatalf("send: %v", err)
	}
}

func (c *client) sendHex(s string) { c.t.Helper(); c.send(unhex(c.t, s)) }

func (c *client) read(what string, n int) []byte {
	c.t.Helper()
	b := make([]byte, n)
	if got, err := io.ReadFull(c.conn, b); err != nil {
		c.t.Fatalf("%s: read %d of %d bytes: %v (got %x)", what, got, n, err, b[:got])
	}
	return b
}

func (c *client) expect(what string, want []byte) {
	c.t.Helper()
	got := c.read(what, len(want))
	if bytes.Equal(got, want) {
		return
	}
	if len(want) > 256 {
		i := 0
		for i < len(want) && got[i] == want[i] {
			i++
		}
		c.t.Fatalf("%s: %d bytes differ first at offset %d", what, len(want), i)
	}
	c.t.Fatalf("%s (-want +got):\n%s", what, cmp.Diff(hex.EncodeToString(want), hex.EncodeToString(got)))
}

func (c *client) expectHex(what, s string) { c.t.Helper(); c.expect(what, unhex(c.t, s)) }

// expectClosed checks that the engine closes the connection without
// sending anything more. A close with our bytes unread shows as a reset.
func (c *client) expectClosed(what string) {
	c.t.Helper()
	b, err := io.ReadAll(c.conn)
	if len(b) > 0 {
		c.t.Fatalf("%s: want the connection closed with nothing sent, got %d bytes: %x", what, len(b), b[:min(len(b), 64)])
	}
	if err != nil && !errors.Is(err, syscall.ECONNRESET) {
		c.t.Fatalf("%s: want the connection closed, got %v", what, err)
	}
}

// greet reads the greeting and answers with the only flags mvps-te takes.
func (c *client) greet() {
	c.t.Helper()
	c.expectHex("greeting", hexGreeting)
	c.sendHex("00000003")
}

func (c *client) sendExportName(token string) {
	c.t.Helper()
	c.sendHex(optionHex(1, []byte(token)))
}

// handshake runs a complete handshake that must succeed with size.
func (c *client) handshake(token string, size uint64) {
	c.t.Helper()
	c.greet()
	c.sendExportName(token)
	c.expectHex("export info", exportInfoHex(size))
}

func (c *client) request(cmd nbd.Command, handle, offset uint64, length uint32, payload []byte) {
	c.t.Helper()
	c.send(append(requestBytes(cmd, handle, offset, length), payload...))
}

func requestBytes(cmd nbd.Command, handle, offset uint64, length uint32) []byte {
	return unhexMust(hexReqMagic + "0000" + fmt.Sprintf("%04x", uint16(cmd)) + be64(handle) + be64(offset) + be32(length))
}

func unhexMust(s string) []byte {
	b, err := hex.DecodeString(s)
	if err != nil {
		panic(err)
	}
	return b
}

func replyHex(handle uint64, errno nbd.Errno) string {
	return hexRepSimpl + be32(uint32(errno)) + be64(handle)
}

// expectReply reads one simple reply and, for a successful READ, its data.
func (c *client) expectReply(what string, handle uint64, errno nbd.Errno, data []byte) {
	c.t.Helper()
	c.expect(what, append(unhex(c.t, replyHex(handle, errno)), data...))
}

func (c *client) write(handle, offset uint64, data []byte) {
	c.t.Helper()
	c.request(nbd.CmdWrite, handle, offset, uint32(len(data)), data)
	c.expectReply(fmt.Sprintf("WRITE %d@%d", len(data), offset), handle, 0, nil)
}

func (c *client) readAt(handle, offset uint64, want []byte) {
	c.t.Helper()
	c.request(nbd.CmdRead, handle, offset, uint32(len(want)), nil)
	c.expectReply(fmt.Sprintf("READ %d@%d", len(want), offset), handle, 0, want)
}

// signRaw builds a token from literal header and claims JSON, signed with
// the HMAC the alg names ("none" leaves the signature empty).
func signRaw(secret []byte, headerJSON, claimsJSON string) string {
	enc := base64.RawURLEncoding
	msg := enc.EncodeToString([]byte(headerJSON)) + "." + enc.EncodeToString([]byte(claimsJSON))
	var h func() hash.Hash
	switch {
	case strings.Contains(headerJSON, `"HS384"`):
		h = sha512.New384
	case strings.Contains(headerJSON, `"HS512"`):
		h = sha512.New
	case strings.Contains(headerJSON, `"none"`):
		return msg + "."
	default:
		h = sha256.New
	}
	mac := hmac.New(h, secret)
	mac.Write([]byte(msg))
	return msg + "." + enc.EncodeToString(mac.Sum(nil))
}

// signHS256 signs with HMAC-SHA256 whatever the header says.
func signHS256(secret []byte, headerJSON, claimsJSON string) string {
	enc := base64.RawURLEncoding
	msg := enc.EncodeToString([]byte(headerJSON)) + "." + enc.EncodeToString([]byte(claimsJSON))
	mac := hmac.New(sha256.New, secret)
	mac.Write([]byte(msg))
	return msg + "." + enc.EncodeToString(mac.Sum(nil))
}

const hs256Header = `{"alg":"HS256","typ":"JWT"}`
