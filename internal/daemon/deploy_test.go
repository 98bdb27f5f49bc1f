package daemon

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"k8s.io/apimachinery/pkg/api/resource"
	"sigs.k8s.io/yaml"
)

const promDir = "../../deploy/prometheus"

func readYAML(t *testing.T, path string) map[string]any {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var v map[string]any
	if err := yaml.Unmarshal(b, &v); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return v
}

// documentedMetrics reads the metrics table of docs/operating.md: name
// (without the namespace) and type of each row.
func documentedMetrics(t *testing.T) map[string]string {
	t.Helper()
	doc, err := os.ReadFile("../../docs/operating.md")
	if err != nil {
		t.Fatal(err)
	}
	section := string(doc)
	start := strings.Index(section, "## Metrics and health")
	if start < 0 {
		t.Fatal("docs/operating.md has no Metrics and health section")
	}
	section = section[start:]
	if end := strings.Index(section[1:], "\n## "); end > 0 {
		section = section[:end]
	}
	row := regexp.MustCompile("(?m)^\\| `([a-z_]+)` \\| (counter|gauge|histogram) \\|")
	docs := map[string]string{}
	for _, m := range row.FindAllStringSubmatch(section, -1) {
		docs[m[1]] = m[2]
	}
	if len(docs) < 10 {
		t.Fatalf("found only %d metrics in docs/operating.md's table", len(docs))
	}
	return docs
}

// The PrometheusRule for the operator holds the very rules that promtool
// tests.
func TestPrometheusRuleIsTheRulesFile(t *testing.T) {
	rules := readYAML(t, filepath.Join(promDir, "mvps-provisioner.rules.yml"))
	pr := readYAML(t, filepath.Join(promDir, "prometheusrule.yaml"))
	spec, _ := pr["spec"].(map[string]any)
	if diff := cmp.Diff(rules["groups"], spec["groups"]); diff != "" {
		t.Fatalf("prometheusrule.yaml's groups differ from mvps-provisioner.rules.yml (-rules +PrometheusRule):\n%s", diff)
	}
}

// dashboardExprs returns the PromQL of every panel of the dashboard.
func dashboardExprs(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(promDir, "grafana-dashboard.json"))
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("grafana-dashboard.json: %v", err)
	}
	var exprs []string
	for _, p := range d.Panels {
		for _, tg := range p.Targets {
			exprs = append(exprs, tg.Expr)
		}
	}
	if len(exprs) == 0 {
		t.Fatal("the dashboard has no queries")
	}
	return exprs
}

// The alerts and the dashboard ask only for metrics the daemon documents
// (and so serves from the start: TestFreshDaemonHasEveryDocumentedSeriesAtZero).
func TestRulesAndDashboardUseDocumentedMetrics(t *testing.T) {
	docs := documentedMetrics(t)
	rules, err := os.ReadFile(filepath.Join(promDir, "mvps-provisioner.rules.yml"))
	if err != nil {
		t.Fatal(err)
	}
	text := string(rules) + "\n" + strings.Join(dashboardExprs(t), "\n")
	used := regexp.MustCompile(`mvps_provisioner_([a-z_]+)`).FindAllStringSubmatch(text, -1)
	if len(used) == 0 {
		t.Fatal("no metric found in the rules or the dashboard")
	}
	for _, m := range used {
		name := m[1]
		for _, suffix := range []string{"_bucket", "_count", "_sum"} {
			if base, ok := strings.CutSuffix(name, suffix); ok && docs[base] == "histogram" {
				name = base
			}
		}
		if docs[name] == "" {
			t.Errorf("mvps_provisioner_%s is used in deploy/prometheus but is no documented metric", m[1])
		}
	}
}

// Every query of the dashboard is PromQL that Prometheus parses: promtool
// checks them as recording rules, Grafana's variables filled in.
func TestDashboardQueriesParse(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("promtool is not installed (Debian package prometheus; make deps)")
		}
		t.Skip("promtool is not installed (Debian package prometheus)")
	}
	fill := strings.NewReplacer("$__rate_interval", "5m", "$instance", ".*")
	var rules []map[string]string
	for i, e := range dashboardExprs(t) {
		rules = append(rules, map[string]string{"record": "dashboard:query" + strconv.Itoa(i), "expr": fill.Replace(e)})
	}
	b, err := yaml.Marshal(map[string]any{"groups": []any{map[string]any{"name": "dashboard", "rules": rules}}})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "dashboard.rules.yml")
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(promtool, "check", "rules", path).CombinedOutput(); err != nil {
		t.Fatalf("the dashboard's queries do not parse: %v\n%s", err, out)
	}
}

// The DaemonSet asks for the memory its engine's cache takes: at least
// 128 MiB (the daemon and the engine) above the cache of one image.
func TestDaemonSetMemoryCoversTheEngineCache(t *testing.T) {
	b, err := os.ReadFile("../../deploy/kubernetes/50-daemonset.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var ds struct {
		Spec struct {
			Template struct {
				Spec struct {
					Containers []struct {
						Name string `json:"name"`
						Env  []struct {
							Name  string `json:"name"`
							Value string `json:"value"`
						} `json:"env"`
						Resources struct {
							Requests map[string]string `json:"requests"`
						} `json:"resources"`
					} `json:"containers"`
				} `json:"spec"`
			} `json:"template"`
		} `json:"spec"`
	}
	if err := yaml.Unmarshal(b, &ds); err != nil {
		t.Fatal(err)
	}
	// The engine's container: the engine runs on its own there.
	for _, c := range ds.Spec.Template.Spec.Containers {
		if c.Name != "engine" {
			continue
		}
		cache := int64(1 << 30) // mvps-te's default
		for _, e := range c.Env {
			if e.Name == "MVPS_TE_IMAGE_CACHE_SIZE_BYTES" {
				if cache, err = strconv.ParseInt(e.Value, 10, 64); err != nil {
					t.Fatalf("MVPS_TE_IMAGE_CACHE_SIZE_BYTES %q: %v", e.Value, err)
				}
			}
		}
		req, err := resource.ParseQuantity(c.Resources.Requests["memory"])
		if err != nil {
			t.Fatalf("memory request %q: %v", c.Resources.Requests["memory"], err)
		}
		if need := cache + 128<<20; req.Value() < need {
			t.Fatalf("memory request %s is below the engine's cache (%d bytes) plus 128 MiB", req.String(), cache)
		}
		return
	}
	t.Fatal("the DaemonSet has no container named engine")
}
