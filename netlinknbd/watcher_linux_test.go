//go:build linux

package netlinknbd

import (
	"context"
	"errors"
	"os"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/genetlink/genltest"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

func TestDecodeLinkDead(t *testing.T) {
	tests := []struct {
		name    string
		msg     genetlink.Message
		want    LinkDead
		wantOK  bool
		wantErr bool
	}{
		{name: "link dead", msg: indexMessage(cmdLinkDead, 12), want: LinkDead{Index: 12}, wantOK: true},
		{name: "other command", msg: indexMessage(cmdStatus, 12)},
		{name: "no index", msg: genetlink.Message{Header: genetlink.Header{Command: cmdLinkDead}}, wantErr: true},
		{
			name: "short index",
			msg: genetlink.Message{
				Header: genetlink.Header{Command: cmdLinkDead},
				Data:   must(netlink.MarshalAttributes([]netlink.Attribute{{Type: attrIndex, Data: []byte{1}}})),
			},
			wantErr: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok, err := decodeLinkDead(tt.msg)
			if (err != nil) != tt.wantErr {
				t.Fatalf("error = %v, want error: %v", err, tt.wantErr)
			}
			if ok != tt.wantOK {
				t.Errorf("ok = %v, want %v", ok, tt.wantOK)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("event (-want +got):\n%s", diff)
			}
		})
	}
}

func testWatcher(t *testing.T) (*Watcher, *fakeSocket) {
	t.Helper()
	conn, sock := dialFake(t, func(genetlink.Message, netlink.Message) ([]genetlink.Message, error) {
		t.Error("watcher sent a request other than the family lookup")
		return nil, unix.EINVAL
	})
	w, err := initWatcher(conn)
	if err != nil {
		t.Fatalf("initWatcher: %v", err)
	}
	return &Watcher{w: w}, sock
}

func receiveWithin(t *testing.T, w *Watcher, d time.Duration) (LinkDead, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	return w.Receive(ctx)
}

func TestWatcherJoinsGroup(t *testing.T) {
	_, sock := testWatcher(t)
	if diff := cmp.Diff([]uint32{9}, sock.joined()); diff != "" {
		t.Errorf("joined groups (-want +got):\n%s", diff)
	}
}

func TestWatcherMissingGroup(t *testing.T) {
	f := testFamily
	f.Groups = f.Groups[:1]
	sock := newFakeSocket(genltest.ServeFamily(f, func(genetlink.Message, netlink.Message) ([]genetlink.Message, error) {
		return nil, unix.EINVAL
	}))
	conn := genetlink.NewConn(netlink.NewConn(sock, 1))
	defer conn.Close()
	if _, err := initWatcher(conn); err == nil {
		t.Fatal("initWatcher succeeded without the nbd multicast group")
	}
}

func TestWatcherReceive(t *testing.T) {
	w, sock := testWatcher(t)

	// Two events in one datagram, with messages that are not LINK_DEAD
	// events of the nbd family mixed in.
	other := indexMessage(cmdLinkDead, 99)
	otherBytes := must(other.MarshalBinary())
	sock.push([]netlink.Message{
		{Header: netlink.Header{Type: netlink.HeaderType(testFamily.ID)}, Data: must(indexMessage(cmdLinkDead, 2).MarshalBinary())},
		{Header: netlink.Header{Type: netlink.HeaderType(testFamily.ID + 1)}, Data: otherBytes},
		{Header: netlink.Header{Type: netlink.HeaderType(testFamily.ID)}, Data: must(indexMessage(cmdStatus, 98).MarshalBinary())},
		{Header: netlink.Header{Type: netlink.HeaderType(testFamily.ID)}, Data: must(indexMessage(cmdLinkDead, 5).MarshalBinary())},
	})
	sock.multicast(t, indexMessage(cmdLinkDead, 7))

	var got []LinkDead
	for range 3 {
		ev, err := receiveWithin(t, w, 5*time.Second)
		if err != nil {
			t.Fatalf("Receive: %v", err)
		}
		got = append(got, ev)
	}
	if diff := cmp.Diff([]LinkDead{{2}, {5}, {7}}, got); diff != "" {
		t.Errorf("events (-want +got):\n%s", diff)
	}
}

func TestWatcherReceiveBlocksUntilEvent(t *testing.T) {
	w, sock := testWatcher(t)
	type result struct {
		ev  LinkDead
		err error
	}
	done := make(chan result, 1)
	go func() {
		ev, err := receiveWithin(t, w, 10*time.Second)
		done <- result{ev, err}
	}()
	sock.waitBlocked(t)
	sock.multicast(t, indexMessage(cmdLinkDead, 3))
	r := <-done
	if r.err != nil || r.ev != (LinkDead{Index: 3}) {
		t.Fatalf("Receive = %+v, %v; want {3}, nil", r.ev, r.err)
	}
}

func TestWatcherContext(t *testing.T) {
	w, sock := testWatcher(t)

	t.Run("cancel unblocks", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() {
			_, err := w.Receive(ctx)
			done <- err
		}()
		sock.waitBlocked(t)
		cancel()
		select {
		case err := <-done:
			if !errors.Is(err, context.Canceled) {
				t.Fatalf("Receive = %v, want context.Canceled", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("Receive did not return after cancel")
		}
	})

	t.Run("deadline", func(t *testing.T) {
		start := time.Now()
		_, err := receiveWithin(t, w, 20*time.Millisecond)
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Receive = %v, want context.DeadlineExceeded", err)
		}
		if elapsed := time.Since(start); elapsed > 5*time.Second {
			t.Errorf("Receive took %v to honour a 20ms deadline", elapsed)
		}
	})

	t.Run("already cancelled", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		sock.multicast(t, indexMessage(cmdLinkDead, 1))
		if _, err := w.Receive(ctx); !errors.Is(err, context.Canceled) {
			t.Fatalf("Receive = %v, want context.Canceled", err)
		}
	})

	// A cancelled Receive must leave the socket usable, with no wake-up
	// left that would cut the next call short.
	t.Run("usable afterwards", func(t *testing.T) {
		ev, err := receiveWithin(t, w, 10*time.Second)
		if err != nil || ev != (LinkDead{Index: 1}) {
			t.Fatalf("Receive = %+v, %v; want {1}, nil", ev, err)
		}
	})
}

func TestWatcherEventsLost(t *testing.T) {
	w, sock := testWatcher(t)
	sock.failNextReceive(os.NewSyscallError("recvmsg", unix.ENOBUFS))
	sock.multicast(t, indexMessage(cmdLinkDead, 4))

	if _, err := receiveWithin(t, w, 5*time.Second); !errors.Is(err, ErrEventsLost) {
		t.Fatalf("Receive = %v, want ErrEventsLost", err)
	}
	ev, err := receiveWithin(t, w, 5*time.Second)
	if err != nil || ev != (LinkDead{Index: 4}) {
		t.Fatalf("Receive after loss = %+v, %v; want {4}, nil", ev, err)
	}
}

func TestWatcherMalformedEventKeepsOthers(t *testing.T) {
	w, sock := testWatcher(t)
	sock.multicast(t,
		indexMessage(cmdLinkDead, 8),
		genetlink.Message{Header: genetlink.Header{Command: cmdLinkDead}},
	)
	if _, err := receiveWithin(t, w, 5*time.Second); err == nil {
		t.Fatal("Receive hid a malformed event")
	}
	ev, err := receiveWithin(t, w, 5*time.Second)
	if err != nil || ev != (LinkDead{Index: 8}) {
		t.Fatalf("Receive = %+v, %v; want {8}, nil", ev, err)
	}
}

func TestWatcherCloseUnblocks(t *testing.T) {
	w, sock := testWatcher(t)
	done := make(chan error, 1)
	go func() {
		_, err := w.Receive(context.Background())
		done <- err
	}()
	sock.waitBlocked(t)
	if err := w.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("Receive on a closed Watcher succeeded")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not unblock Receive")
	}
}
