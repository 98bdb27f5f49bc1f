// Package kubeclient connects the project's programs to a Kubernetes API
// server with client-go's REST client and the types of one API group at a
// time.
//
// client-go's typed clients (the clientset and each group's package) share
// one scheme that registers every API group Kubernetes has. Linked into a
// program, that scheme makes its binary about 23 MB larger and adds 10 MB
// to its resident memory from the first instruction on, for types the
// program never uses. A client made here knows its own group only;
// client-go's generic gentype clients do the requests, as they do for the
// typed clients.
package kubeclient

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// ConfigFromEnv is the API server connection a program uses: the
// in-cluster configuration (service account token and CA) when it runs in
// a pod, which Kubernetes announces with KUBERNETES_SERVICE_HOST, otherwise
// the kubeconfig file(s) named by KUBECONFIG.
func ConfigFromEnv() (*rest.Config, error) {
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

// Group is a REST client for one API group version, with the codec of its
// query parameters: what client-go's gentype clients are made of.
type Group struct {
	REST   *rest.RESTClient
	Params runtime.ParameterCodec
}

// ForGroup returns a client of gv on the API server cfg describes, whose
// scheme holds what addToScheme registers (the group's AddToScheme) and
// meta/v1's options.
func ForGroup(cfg *rest.Config, gv schema.GroupVersion, addToScheme func(*runtime.Scheme) error) (Group, error) {
	scheme := runtime.NewScheme()
	if err := addToScheme(scheme); err != nil {
		return Group{}, fmt.Errorf("scheme of %s: %w", gv, err)
	}
	// Options are encoded as query parameters through the unversioned
	// meta/v1 types, as client-go's own scheme registers them.
	metav1.AddToGroupVersion(scheme, schema.GroupVersion{Version: "v1"})

	c := rest.CopyConfig(cfg)
	c.GroupVersion = &gv
	c.APIPath = "/apis"
	if gv.Group == "" {
		c.APIPath = "/api" // the core group
	}
	c.NegotiatedSerializer = serializer.NewCodecFactory(scheme).WithoutConversion()
	if c.UserAgent == "" {
		c.UserAgent = rest.DefaultKubernetesUserAgent()
	}
	rc, err := rest.RESTClientFor(c)
	if err != nil {
		return Group{}, fmt.Errorf("REST client of %s for %s: %w", gv, cfg.Host, err)
	}
	return Group{REST: rc, Params: runtime.NewParameterCodec(scheme)}, nil
}
