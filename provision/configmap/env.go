package configmap

import (
	"context"
	"fmt"
	"log/slog"
	"strings"

	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/rest"
	"k8s.io/klog/v2"

	"github.com/mvps-provisioner/mvps-provisioner/internal/kubeclient"
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

// StartFromEnv is Start for the daemon, which waits for the first sync
// itself (WaitSynced): ref is PROVISIONER_IMAGES_CM, the connection comes
// from kubeclient.ConfigFromEnv. It also sends client-go's own log lines
// (klog) to log, so the daemon has one log format; that setting is
// process-wide, which suits the daemon and nothing else.
func StartFromEnv(ctx context.Context, ref string, log *slog.Logger, opts ...Option) (*Source, error) {
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
	return Start(ctx, client, namespace, name, log, append([]Option{WithServer(cfg.Host)}, opts...)...)
}

// refFromEnv parses PROVISIONER_IMAGES_CM's ref and finds the connection
// to its API server (kubeclient.ConfigFromEnv); its errors name the setting.
func refFromEnv(ref string) (namespace, name string, cfg *rest.Config, err error) {
	namespace, name, err = ParseRef(ref)
	if err != nil {
		return "", "", nil, fmt.Errorf("PROVISIONER_IMAGES_CM: %w", err)
	}
	cfg, err = kubeclient.ConfigFromEnv()
	if err != nil {
		return "", "", nil, fmt.Errorf("PROVISIONER_IMAGES_CM %s: %w", ref, err)
	}
	return namespace, name, cfg, nil
}
