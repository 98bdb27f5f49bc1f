package configmap

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
)

// ParseRef splits PROVISIONER_IMAGES_CM's "<namespace>/<name>" and checks
// both parts as the API server would.
func ParseRef(ref string) (namespace, name string, err error) {
	namespace, name, ok := strings.Cut(ref, "/")
	if !ok {
		return "", "", fmt.Errorf("%q is not <namespace>/<name>", ref)
	}
	if err := ValidateRef(namespace, name); err != nil {
		return "", "", err
	}
	return namespace, name, nil
}

// ValidateRef checks a ConfigMap's namespace and name, so that a typo stops
// start-up with a clear line instead of a sync that can never succeed.
func ValidateRef(namespace, name string) error {
	if errs := validation.IsDNS1123Label(namespace); len(errs) > 0 {
		return fmt.Errorf("namespace %q: %s", namespace, strings.Join(errs, "; "))
	}
	if errs := validation.IsDNS1123Subdomain(name); len(errs) > 0 {
		return fmt.Errorf("ConfigMap name %q: %s", name, strings.Join(errs, "; "))
	}
	return nil
}

// RESTConfigFromEnv is the API server connection the daemon uses: the
// in-cluster configuration (service account token and CA) when it runs in a
// pod, which Kubernetes announces with KUBERNETES_SERVICE_HOST, otherwise
// the kubeconfig file(s) named by KUBECONFIG.
func RESTConfigFromEnv() (*rest.Config, error) {
	if os.Getenv("KUBERNETES_SERVICE_HOST") != "" {
		cfg, err := rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("in-cluster configuration: %w", err)
		}
		return cfg, nil
	}
	kubeconfig := os.Getenv("KUBECONFIG")
	if kubeconfig == "" {
		return nil, errors.New("outside a pod (no KUBERNETES_SERVICE_HOST) KUBECONFIG must name a kubeconfig file")
	}
	rules := &clientcmd.ClientConfigLoadingRules{Precedence: filepath.SplitList(kubeconfig)}
	cfg, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{}).ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("KUBECONFIG %s: %w", kubeconfig, err)
	}
	return cfg, nil
}

// NewFromEnv is New for the daemon: ref is PROVISIONER_IMAGES_CM, the
// connection comes from RESTConfigFromEnv. It also sends client-go's own
// log lines (klog) to log, so the daemon has one log format; that setting
// is process-wide, which suits the daemon and nothing else.
func NewFromEnv(ctx context.Context, ref string, log *slog.Logger, opts ...Option) (*Source, error) {
	namespace, name, cfg, err := refFromEnv(ref)
	if err != nil {
		return nil, err
	}
	cfg.UserAgent = "mvps-provisioner"
	client, err := NewRESTClient(cfg, namespace)
	if err != nil {
		return nil, fmt.Errorf("PROVISIONER_IMAGES_CM %s: %w", ref, err)
	}
	if log != nil {
		klog.SetSlogLogger(log.With("component", "client-go"))
	}
	return New(ctx, client, namespace, name, log, append([]Option{WithServer(cfg.Host)}, opts...)...)
}

// refFromEnv parses PROVISIONER_IMAGES_CM's ref and finds the connection
// to its API server (RESTConfigFromEnv); its errors name the setting.
func refFromEnv(ref string) (namespace, name string, cfg *rest.Config, err error) {
	namespace, name, err = ParseRef(ref)
	if err != nil {
		return "", "", nil, fmt.Errorf("PROVISIONER_IMAGES_CM: %w", err)
	}
	cfg, err = RESTConfigFromEnv()
	if err != nil {
		return "", "", nil, fmt.Errorf("PROVISIONER_IMAGES_CM %s: %w", ref, err)
	}
	return namespace, name, cfg, nil
}
