//go:build linux

package kubetest

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// adminToken is a static token of system:masters, for the tests' own
// set-up; what the provisioner does is tested with a service account token.
const adminToken = "kubetest-admin-token"

// binDir is where kubetest/build.sh puts the servers.
func binDir() string {
	if d := os.Getenv("MVPS_K8S_BIN"); d != "" {
		return d
	}
	return filepath.Join("..", ".cache", "k8s", "bin")
}

// shared is one etcd and one API server for the whole package, started by
// the first test that needs them and stopped by TestMain.
var shared struct {
	once sync.Once
	etcd *process
	api  *apiServer
	dir  string
	err  error
}

func TestMain(m *testing.M) {
	code := m.Run()
	if shared.api != nil {
		shared.api.stop()
	}
	if shared.etcd != nil {
		shared.etcd.stop()
	}
	if shared.dir != "" {
		os.RemoveAll(shared.dir)
	}
	os.Exit(code)
}

// cluster returns the shared API server, starting it if needed. Without the
// binaries it skips the test, or fails it when MVPS_K8S_TESTS=1 says the
// run must include these tests.
func cluster(t *testing.T) *apiServer {
	t.Helper()
	for _, b := range []string{"etcd", "kube-apiserver"} {
		if _, err := os.Stat(filepath.Join(binDir(), b)); err != nil {
			if os.Getenv("MVPS_K8S_TESTS") == "1" {
				t.Fatalf("MVPS_K8S_TESTS=1 but %s is missing (%v): run bash kubetest/build.sh", b, err)
			}
			t.Skipf("no %s in %s: run 'make k8s-test' (builds it with kubetest/build.sh, about 10 min the first time)", b, binDir())
		}
	}
	shared.once.Do(func() {
		start := time.Now()
		shared.dir, shared.err = os.MkdirTemp("", "kubetest-")
		if shared.err != nil {
			return
		}
		shared.etcd, shared.err = startEtcd(shared.dir)
		if shared.err != nil {
			return
		}
		shared.api, shared.err = startAPIServer(shared.dir, "a", shared.etcd.url)
		if shared.err == nil {
			fmt.Fprintf(os.Stderr, "kubetest: etcd and kube-apiserver ready on %s in %v\n", shared.api.host, time.Since(start).Round(time.Millisecond))
		}
	})
	if shared.err != nil {
		t.Fatalf("starting etcd and kube-apiserver: %v", shared.err)
	}
	return shared.api
}

// process is a server started by the tests, its output in a log file.
type process struct {
	name   string
	cmd    *exec.Cmd
	log    string
	url    string
	exited chan struct{}
	err    error // after exited
}

func startProcess(dir, name string, args ...string) (*process, error) {
	logPath := filepath.Join(dir, name+".log")
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	bin := name
	if i := strings.IndexByte(name, '-'); i > 0 && name[:i] == "kube" {
		bin = "kube-apiserver"
	}
	cmd := exec.Command(filepath.Join(binDir(), bin), args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Never outlive the test binary, whatever happens to it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &process{name: name, cmd: cmd, log: logPath, exited: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		logf.Close()
		close(p.exited)
	}()
	return p, nil
}

// tail is the end of the process's log, for a failure message.
func (p *process) tail() string {
	b, _ := os.ReadFile(p.log)
	if len(b) > 3000 {
		b = b[len(b)-3000:]
	}
	return string(b)
}

// stop ends the process with SIGTERM, then SIGKILL if it takes too long:
// kube-apiserver's graceful shutdown can wait for open watches.
func (p *process) stop() {
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
func (p *process) waitReady(bound time.Duration, check func() error) error {
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

func startEtcd(dir string) (*process, error) {
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
	p, err := startProcess(dir, "etcd",
		"--name=kubetest", "--data-dir="+filepath.Join(dir, "etcd"),
		"--listen-client-urls="+clientURL, "--advertise-client-urls="+clientURL,
		"--listen-peer-urls="+peerURL, "--initial-advertise-peer-urls="+peerURL,
		"--initial-cluster=kubetest="+peerURL,
		// A test cluster's data is thrown away: no fsync.
		"--unsafe-no-fsync", "--log-level=warn")
	if err != nil {
		return nil, err
	}
	p.url = clientURL
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
		p.stop()
		return nil, err
	}
	return p, nil
}

// apiServer is a kube-apiserver that can be stopped and started again with
// the same port, certificate and keys.
type apiServer struct {
	name string
	dir  string
	args []string
	host string // https://127.0.0.1:PORT
	ca   string // file holding the self-signed serving certificate's CA
	proc *process
}

func startAPIServer(parent, name, etcdURL string) (*apiServer, error) {
	dir := filepath.Join(parent, "apiserver-"+name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	// The service account signing key is shared by every server of the
	// cluster (a token from one is valid on the other), so it lives in
	// parent.
	saKey := filepath.Join(parent, "sa.key")
	if _, err := os.Stat(saKey); errors.Is(err, os.ErrNotExist) {
		key, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			return nil, err
		}
		der := x509.MarshalPKCS1PrivateKey(key)
		if err := os.WriteFile(saKey, pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: der}), 0o600); err != nil {
			return nil, err
		}
	}
	tokens := filepath.Join(parent, "tokens.csv")
	if err := os.WriteFile(tokens, []byte(adminToken+`,kubetest-admin,kubetest-admin,"system:masters"`+"\n"), 0o600); err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	certDir := filepath.Join(dir, "certs")
	s := &apiServer{
		name: name,
		dir:  dir,
		host: fmt.Sprintf("https://127.0.0.1:%d", port),
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
		},
	}
	if err := s.start(); err != nil {
		return nil, err
	}
	return s, nil
}

// start runs the server and waits for /readyz.
func (s *apiServer) start() error {
	p, err := startProcess(s.dir, "kube-apiserver-"+s.name, s.args...)
	if err != nil {
		return err
	}
	s.proc = p
	// The certificate appears only once the server runs, so /readyz is
	// checked without verifying it; clients verify it through s.ca.
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	defer hc.CloseIdleConnections()
	err = p.waitReady(90*time.Second, func() error {
		req, _ := http.NewRequest(http.MethodGet, s.host+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+adminToken)
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
		p.stop()
		return err
	}
	return nil
}

func (s *apiServer) stop() {
	if s.proc != nil {
		s.proc.stop()
		s.proc = nil
	}
}

// crash kills the server at once, as a crash or a lost node would.
func (s *apiServer) crash() {
	if s.proc != nil {
		_ = s.proc.cmd.Process.Kill()
		<-s.proc.exited
		s.proc = nil
	}
}

// restConfig is a connection to the server with a bearer token.
func (s *apiServer) restConfig(token string) *rest.Config {
	return &rest.Config{Host: s.host, BearerToken: token, TLSClientConfig: rest.TLSClientConfig{CAFile: s.ca}}
}

func (s *apiServer) admin(t *testing.T) *kubernetes.Clientset {
	t.Helper()
	cs, err := kubernetes.NewForConfig(s.restConfig(adminToken))
	if err != nil {
		t.Fatal(err)
	}
	return cs
}

// kubeconfig writes a kubeconfig for the server and token, as a node
// outside the cluster would have.
func (s *apiServer) kubeconfig(t *testing.T, token string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "kubeconfig")
	content := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters: [{name: kubetest, cluster: {server: %q, certificate-authority: %q}}]
users: [{name: provisioner, user: {token: %q}}]
contexts: [{name: kubetest, context: {cluster: kubetest, user: provisioner}}]
current-context: kubetest
`, s.host, s.ca, token)
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), d)
	t.Cleanup(cancel)
	return ctx
}
