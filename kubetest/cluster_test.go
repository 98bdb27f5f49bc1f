//go:build linux

package kubetest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/internal/kubecluster"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// adminToken is a static token of system:masters, for the tests' own
// set-up; what the provisioner does is tested with a service account token.
const adminToken = kubecluster.AdminToken

// binDir is where kubetest/build.sh puts the servers: MVPS_K8S_BIN (make
// sets it), or what the script says.
func binDir() string {
	if d := os.Getenv("MVPS_K8S_BIN"); d != "" {
		return d
	}
	out, err := exec.Command("bash", "build.sh", "--bin-dir").Output()
	if err != nil {
		return filepath.Join("..", ".cache", "k8s", "bin")
	}
	return strings.TrimSpace(string(out))
}

// shared is one etcd and one API server for the whole package, started by
// the first test that needs them and stopped by TestMain.
var shared struct {
	once sync.Once
	etcd *kubecluster.Process
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
		shared.etcd.Stop()
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
		shared.etcd, shared.err = kubecluster.StartEtcd(binDir(), shared.dir)
		if shared.err != nil {
			return
		}
		var api *kubecluster.APIServer
		api, shared.err = kubecluster.StartAPIServer(binDir(), shared.dir, "a", shared.etcd.URL)
		if shared.err == nil {
			shared.api = &apiServer{api}
			fmt.Fprintf(os.Stderr, "kubetest: etcd and kube-apiserver ready on %s in %v\n", api.Host(), time.Since(start).Round(time.Millisecond))
		}
	})
	if shared.err != nil {
		t.Fatalf("starting etcd and kube-apiserver: %v", shared.err)
	}
	return shared.api
}

// apiServer is the shared kube-apiserver, with the tests' helpers.
type apiServer struct {
	*kubecluster.APIServer
}

func (s *apiServer) start() error { return s.Start() }
func (s *apiServer) stop()        { s.Stop() }
func (s *apiServer) crash()       { s.Crash() }

func (s *apiServer) restConfig(token string) *rest.Config { return s.RESTConfig(token) }

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
	if err := s.Kubeconfig(path, token); err != nil {
		t.Fatal(err)
	}
	return path
}

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), d)
	t.Cleanup(cancel)
	return ctx
}
