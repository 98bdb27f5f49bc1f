package configmap

import (
	"context"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/rest"
)

// restClient lists and watches ConfigMaps through a REST client whose
// scheme has core/v1 only. It does what client-go's typed ConfigMaps client
// does for List and Watch, without that client's scheme of every API group.
type restClient struct {
	rc        *rest.RESTClient
	namespace string
	params    runtime.ParameterCodec
}

// NewRESTClient returns a Client for the ConfigMaps of namespace on the API
// server cfg describes.
func NewRESTClient(cfg *rest.Config, namespace string) (Client, error) {
	scheme := runtime.NewScheme()
	if err := corev1.AddToScheme(scheme); err != nil {
		return nil, fmt.Errorf("core/v1 scheme: %w", err)
	}
	// ListOptions are encoded as query parameters through the unversioned
	// meta/v1 types, as client-go's own scheme registers them.
	metav1.AddToGroupVersion(scheme, schema.GroupVersion{Version: "v1"})

	c := rest.CopyConfig(cfg)
	c.GroupVersion = &corev1.SchemeGroupVersion
	c.APIPath = "/api"
	c.NegotiatedSerializer = serializer.NewCodecFactory(scheme).WithoutConversion()
	if c.UserAgent == "" {
		c.UserAgent = rest.DefaultKubernetesUserAgent()
	}
	rc, err := rest.RESTClientFor(c)
	if err != nil {
		return nil, fmt.Errorf("REST client for %s: %w", cfg.Host, err)
	}
	return &restClient{rc: rc, namespace: namespace, params: runtime.NewParameterCodec(scheme)}, nil
}

func (c *restClient) List(ctx context.Context, opts metav1.ListOptions) (*corev1.ConfigMapList, error) {
	out := &corev1.ConfigMapList{}
	err := c.rc.Get().Namespace(c.namespace).Resource("configmaps").
		VersionedParams(&opts, c.params).Timeout(timeout(opts)).Do(ctx).Into(out)
	return out, err
}

func (c *restClient) Watch(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
	opts.Watch = true
	return c.rc.Get().Namespace(c.namespace).Resource("configmaps").
		VersionedParams(&opts, c.params).Timeout(timeout(opts)).Watch(ctx)
}

// timeout is the request's own bound: the reflector asks the server to end
// a watch after TimeoutSeconds, and the client waits no longer either.
func timeout(opts metav1.ListOptions) time.Duration {
	if opts.TimeoutSeconds == nil {
		return 0
	}
	return time.Duration(*opts.TimeoutSeconds) * time.Second
}
