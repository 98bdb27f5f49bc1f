package metrics

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Check is one condition of readiness.
type Check struct {
	Name string
	// Func returns nil when the condition holds. It must honour ctx.
	Func func(ctx context.Context) error
}

// CheckAddr accepts the address of the metrics listener: host:port with a
// literal IP. Without allowRemote the IP must be a loopback one: /metrics
// names no image or caller, but it tells the node's load and build to
// anyone who reaches it, unauthenticated, which is nobody else's business
// on a shared network unless the operator says so. An empty host or an
// unspecified IP (all interfaces) and host names are refused then.
func CheckAddr(addr string, allowRemote bool) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("metrics address %q is not host:port: %v", addr, err)
	}
	if port == "" {
		return fmt.Errorf("metrics address %q has no port", addr)
	}
	if allowRemote {
		return nil
	}
	ip, err := netip.ParseAddr(host)
	if err != nil || !ip.IsLoopback() {
		return fmt.Errorf("metrics address %q is not a literal loopback IP (127.0.0.1:P, [::1]:P); set PROVISIONER_METRICS_ALLOW_REMOTE=1 to listen elsewhere", addr)
	}
	return nil
}

// Handler serves /metrics from s, /healthz (the process answers) and
// /readyz (every check passes; the failing ones are listed otherwise, with
// status 503).
func (s *Set) Handler(checks []Check) http.Handler {
	mux := http.NewServeMux()
	if s != nil {
		mux.Handle("/metrics", promhttp.HandlerFor(s.reg, promhttp.HandlerOpts{}))
	}
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 3*time.Second)
		defer cancel()
		var failed []string
		for _, c := range checks {
			if err := c.Func(ctx); err != nil {
				failed = append(failed, c.Name+": "+err.Error())
			}
		}
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if len(failed) > 0 {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintln(w, "not ready")
			fmt.Fprintln(w, strings.Join(failed, "\n"))
			return
		}
		fmt.Fprintln(w, "ok")
	})
	return mux
}

// Server is the metrics HTTP listener.
type Server struct {
	ln  net.Listener
	srv *http.Server
	err chan error
}

// Serve listens on addr (checked with CheckAddr) and serves s's handler
// until Close.
func (s *Set) Serve(addr string, allowRemote bool, checks []Check) (*Server, error) {
	if err := CheckAddr(addr, allowRemote); err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics listener: %w", err)
	}
	hs := &http.Server{
		Handler:           s.Handler(checks),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       time.Minute,
		MaxHeaderBytes:    16 << 10,
	}
	ms := &Server{ln: ln, srv: hs, err: make(chan error, 1)}
	go func() {
		err := hs.Serve(ln)
		if errors.Is(err, http.ErrServerClosed) {
			err = nil
		}
		ms.err <- err
	}()
	return ms, nil
}

// Addr is the address the listener is bound to (the port chosen when addr
// asked for port 0).
func (m *Server) Addr() net.Addr { return m.ln.Addr() }

// Close stops the listener, letting requests in progress finish for a
// moment.
func (m *Server) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := m.srv.Shutdown(ctx); err != nil {
		m.srv.Close()
	}
	return <-m.err
}
