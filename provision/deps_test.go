package provision_test

import (
	"os/exec"
	"strings"
	"testing"
)

// The attach core knows nothing of how it is reached, operated or
// deployed: its transports (the caller socket), the admin protocol,
// metrics, systemd notification and the Kubernetes client sit on top of it
// and are wired up by the daemon (internal/daemon, the commands).
func TestCoreImportsNoOperationsOrKubernetes(t *testing.T) {
	const module = "github.com/mvps-provisioner/mvps-provisioner/"
	forbidden := []string{
		module + "provision/admin", module + "provision/notify", module + "provision/metrics",
		module + "provision/configmap", module + "provision/socketserver", module + "internal/daemon",
		"k8s.io/", "sigs.k8s.io/", "github.com/prometheus/",
	}
	for _, goos := range []string{"linux", "darwin"} {
		cmd := exec.Command("go", "list", "-deps", ".")
		cmd.Env = append(cmd.Environ(), "GOOS="+goos)
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("go list -deps (GOOS=%s): %v", goos, err)
		}
		for _, pkg := range strings.Fields(string(out)) {
			for _, f := range forbidden {
				if strings.HasPrefix(pkg, f) {
					t.Errorf("GOOS=%s: package provision depends on %s", goos, pkg)
				}
			}
		}
	}
}
