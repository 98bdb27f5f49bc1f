package kubeclient_test

import (
	"os/exec"
	"strings"
	"testing"
)

// The programs that talk to the API server do it through clients of one
// group each: client-go's clientset, typed clients and their shared scheme
// of every group (k8s.io/client-go/kubernetes/...) stay out of them. Linked
// in, they took the daemon's binary from 40 to 59 MB and its resident
// memory at start from 21 to 30 MiB.
func TestProgramsLinkNoClientset(t *testing.T) {
	const module = "github.com/mvps-provisioner/mvps-provisioner/"
	for _, cmd := range []string{"cmd/mvps-provisioner", "cmd/mvps-csi", "cmd/mvps-sidecar", "examples/client"} {
		out, err := exec.Command("go", "list", "-deps", module+cmd).Output()
		if err != nil {
			t.Fatalf("go list -deps %s: %v", cmd, err)
		}
		for _, pkg := range strings.Fields(string(out)) {
			if pkg == "k8s.io/client-go/kubernetes" || strings.HasPrefix(pkg, "k8s.io/client-go/kubernetes/") {
				t.Errorf("%s links %s", cmd, pkg)
			}
		}
	}
}
