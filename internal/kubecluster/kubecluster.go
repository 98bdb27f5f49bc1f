//go:build linux

// Package kubecluster runs a real etcd and kube-apiserver on loopback for
// tests: on the host (kubetest) and inside the test VM (vmtest), where the
// image Leases are tried against a real API server next to real devices.
// The binaries come from kubetest/build.sh.
package kubecluster

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"k8s.io/client-go/rest"
)

// ReadyBound bounds the wait for a kube-apiserver's /readyz: a few seconds
// on a host, minutes in a VM without acceleration.
var ReadyBound = 90 * time.Second

// ReadyzExclude names the checks of /readyz that Start does not wait for
// (its exclude parameter). A test whose every client is system:masters can
// leave out "poststarthook/rbac/bootstrap-roles": the default roles that
// hook writes are for other users, and writing them takes the server about
// as long again as its start in a VM without acceleration.
var ReadyzExclude []string

// AdminToken is a static token of system:masters, for a test's own set-up.
const AdminToken = "kubetest-admin-token"

// Host is where the server answers (https://127.0.0.1:PORT).
func (s *APIServer) Host() string { return s.host }

// CA is the file of the server's self-signed certificate.
func (s *APIServer) CA() string { return s.ca }

// Process is a server started here, its output in a log file.
type Process struct {
	name string
	cmd  *exec.Cmd
	log  string
	// URL is where a server (etcd) answers.
	URL    string
	exited chan struct{}
	err    error // after exited
}

func startProcess(binDir, dir, name string, args ...string) (*Process, error) {
	logPath := filepath.Join(dir, name+".log")
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	bin := name
	if i := strings.IndexByte(name, '-'); i > 0 && name[:i] == "kube" {
		bin = "kube-apiserver"
	}
	cmd := exec.Command(filepath.Join(binDir, bin), args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Never outlive the test binary, whatever happens to it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &Process{name: name, cmd: cmd, log: logPath, exited: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		logf.Close()
		close(p.exited)
	}()
	return p, nil
}

// tail is the end of the process's log, for a failure message.
func (p *Process) tail() string {
	b, _ := os.ReadFile(p.log)
	if len(b) > 3000 {
		b = b[len(b)-3000:]
	}
	return string(b)
}

// kube-apiserver's graceful shutdown can wait for open watches.
// Stop ends the process with SIGTERM, then SIGKILL if it takes too long.
func (p *Process) Stop() {
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

// waitReady polls check until it succeeds, the process exits or the bound
// passes.
func (p *Process) waitReady(bound time.Duration, check func() error) error {
	deadline := time.Now().Add(bound)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		err := check()
		if err == nil {
			return nil
		}
		select {
		case <-p.exited:
			return fmt.Errorf("%s exited (%v) before it was ready; log:\n%s", p.name, p.err, p.tail())
		case <-tick.C:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready within %v: %v; log:\n%s", p.name, bound, err, p.tail())
		}
	}
}

// freePort asks the kernel for a loopback port nobody uses now.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// StartEtcd starts etcd (from binDir) with its data in dir, on free
// loopback ports, and waits until it is healthy.
func StartEtcd(binDir, dir string) (*Process, error) {
	client, err := freePort()
	if err != nil {
		return nil, err
	}
	peer, err := freePort()
	if err != nil {
		return nil, err
	}
	clientURL := fmt.Sprintf("http://127.0.0.1:%d", client)
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", peer)
	p, err := startProcess(binDir, dir, "etcd",
		"--name=kubetest", "--data-dir="+filepath.Join(dir, "etcd"),
		"--listen-client-urls="+clientURL, "--advertise-client-urls="+clientURL,
		"--listen-peer-urls="+peerURL, "--initial-advertise-peer-urls="+peerURL,
		"--initial-cluster=kubetest="+peerURL,
		// A test cluster's data is thrown away: no fsync.
		"--unsafe-no-fsync", "--log-level=warn")
	if err != nil {
		return nil, err
	}
	p.URL = clientURL
	err = p.waitReady(30*time.Second, func() error {
		resp, err := http.Get(clientURL + "/health")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("/health: %s", resp.Status)
		}
		return nil
	})
	if err != nil {
		p.Stop()
		return nil, err
	}
	return p, nil
}

// APIServer is a kube-apiserver that can be stopped and started again with
// the same port, certificate and keys.
type APIServer struct {
	binDir string
	name   string
	dir    string
	args   []string
	host   string // https://127.0.0.1:PORT
	ca     string // file holding the self-signed serving certificate's CA
	proc   *Process
}

// StartAPIServer starts a kube-apiserver (from binDir) on etcdURL, its files
// under parent, and waits for /readyz. AdminToken is a static token of
// system:masters.
func StartAPIServer(binDir, parent, name, etcdURL string) (*APIServer, error) {
	dir := filepath.Join(parent, "apiserver-"+name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	// The service account signing key is shared by every server of the
	// cluster (a token from one is valid on the other), so it lives in
	// parent.
	saKey := filepath.Join(parent, "sa.key")
	if _, err := os.Stat(saKey); errors.Is(err, os.ErrNotExist) {
		// ECDSA (ES256), which the server takes as it takes RSA: an RSA
		// key's generation takes seconds in a VM without acceleration.
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, err
		}
		der, err := x509.MarshalECPrivateKey(key)
		if err != nil {
			return nil, err
		}
		if err := os.WriteFile(saKey, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), 0o600); err != nil {
			return nil, err
		}
	}
	tokens := filepath.Join(parent, "tokens.csv")
	if err := os.WriteFile(tokens, []byte(AdminToken+`,kubetest-admin,kubetest-admin,"system:masters"`+"\n"), 0o600); err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	certDir := filepath.Join(dir, "certs")
	s := &APIServer{
		binDir: binDir,
		name:   name,
		dir:    dir,
		host:   fmt.Sprintf("https://127.0.0.1:%d", port),
		// The server makes a self-signed CA and serving certificate for
		// 127.0.0.1 and writes both here.
		ca: filepath.Join(certDir, "apiserver.crt"),
		args: []string{
			"--etcd-servers=" + etcdURL,
			"--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
			fmt.Sprintf("--secure-port=%d", port),
			// Its default reconciler refuses the loopback address.
			"--endpoint-reconciler-type=none",
			"--cert-dir=" + certDir,
			"--service-account-issuer=https://kubernetes.default.svc",
			"--service-account-key-file=" + saKey,
			"--service-account-signing-key-file=" + saKey,
			"--token-auth-file=" + tokens,
			"--authorization-mode=RBAC",
			"--service-cluster-ip-range=10.0.0.0/24",
			// As on any cluster that runs CSI drivers or node agents: the
			// DaemonSet is privileged.
			"--allow-privileged=true",
			// API priority and fairness bootstraps its configuration in
			// post-start hooks that hold /readyz back for minutes in a VM
			// without acceleration; a test server does not need it.
			"--enable-priority-and-fairness=false",
		},
	}
	if err := s.Start(); err != nil {
		return nil, err
	}
	return s, nil
}

// Launch runs the server and returns at once, for a test that waits for
// what it needs of the server in its own way: a restart whose clients
// reconnect, say, long before every post-start hook is done, which /readyz
// waits for (seconds on a host, tens of seconds in a VM without
// acceleration).
func (s *APIServer) Launch() error {
	p, err := startProcess(s.binDir, s.dir, "kube-apiserver-"+s.name, s.args...)
	if err != nil {
		return err
	}
	s.proc = p
	return nil
}

// Start runs the server and waits for /readyz.
func (s *APIServer) Start() error {
	if err := s.Launch(); err != nil {
		return err
	}
	p := s.proc
	// The certificate appears only once the server runs, so /readyz is
	// checked without verifying it; clients verify it through s.ca.
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	defer hc.CloseIdleConnections()
	err := p.waitReady(ReadyBound, func() error {
		req, _ := http.NewRequest(http.MethodGet, s.host+"/readyz"+readyzQuery(), nil)
		req.Header.Set("Authorization", "Bearer "+AdminToken)
		resp, err := hc.Do(req)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("/readyz: %s", resp.Status)
		}
		return nil
	})
	if err != nil {
		p.Stop()
		return err
	}
	return nil
}

// readyzQuery is the query of Start's /readyz: its ReadyzExclude.
func readyzQuery() string {
	if len(ReadyzExclude) == 0 {
		return ""
	}
	return "?" + url.Values{"exclude": ReadyzExclude}.Encode()
}

// Stop ends the server (SIGTERM).
func (s *APIServer) Stop() {
	if s.proc != nil {
		s.proc.Stop()
		s.proc = nil
	}
}

// Crash kills the server at once, as a crash or a lost node would.
func (s *APIServer) Crash() {
	if s.proc != nil {
		_ = s.proc.cmd.Process.Kill()
		<-s.proc.exited
		s.proc = nil
	}
}

// RESTConfig is a connection to the server with a bearer token.
func (s *APIServer) RESTConfig(token string) *rest.Config {
	return &rest.Config{Host: s.host, BearerToken: token, TLSClientConfig: rest.TLSClientConfig{CAFile: s.ca}}
}

// Kubeconfig writes a kubeconfig for the server and token to path, as a
// node outside the cluster would have.
func (s *APIServer) Kubeconfig(path, token string) error {
	content := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters: [{name: kubetest, cluster: {server: %q, certificate-authority: %q}}]
users: [{name: provisioner, user: {token: %q}}]
contexts: [{name: kubetest, context: {cluster: kubetest, user: provisioner}}]
current-context: kubetest
`, s.host, s.ca, token)
	return os.WriteFile(path, []byte(content), 0o600)
}
