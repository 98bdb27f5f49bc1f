package configmap

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/gentype"
	"k8s.io/client-go/rest"

	"github.com/mvps-provisioner/mvps-provisioner/internal/kubeclient"
)

// WriterClient is what a Writer needs of the API server: read, create and
// update the ConfigMaps of one namespace. client-go's typed
// ConfigMapInterface (clientset.CoreV1().ConfigMaps(namespace)) and its
// fake satisfy it, as does NewRESTClient's.
type WriterClient interface {
	Get(ctx context.Context, name string, opts metav1.GetOptions) (*corev1.ConfigMap, error)
	Create(ctx context.Context, cm *corev1.ConfigMap, opts metav1.CreateOptions) (*corev1.ConfigMap, error)
	Update(ctx context.Context, cm *corev1.ConfigMap, opts metav1.UpdateOptions) (*corev1.ConfigMap, error)
}

// RESTClient is a client of the ConfigMaps of one namespace, for a Source
// (Client) and a Writer (WriterClient) alike.
type RESTClient interface {
	Client
	WriterClient
}

// NewRESTClient returns a client for the ConfigMaps of namespace on the API
// server cfg describes. It knows core/v1 only (kubeclient.ForGroup): it does
// what client-go's typed ConfigMaps client does, through the same gentype
// code, without that client's scheme of every API group.
func NewRESTClient(cfg *rest.Config, namespace string) (RESTClient, error) {
	g, err := kubeclient.ForGroup(cfg, corev1.SchemeGroupVersion, corev1.AddToScheme)
	if err != nil {
		return nil, fmt.Errorf("configmap client: %w", err)
	}
	return gentype.NewClientWithList[*corev1.ConfigMap, *corev1.ConfigMapList]("configmaps", g.REST, g.Params, namespace,
		func() *corev1.ConfigMap { return &corev1.ConfigMap{} },
		func() *corev1.ConfigMapList { return &corev1.ConfigMapList{} }), nil
}
