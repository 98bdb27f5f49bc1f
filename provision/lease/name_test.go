package lease_test

import (
	"crypto/sha256"
	"encoding/hex"
	"math/rand/v2"
	"regexp"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/mvps-provisioner/mvps-provisioner/provision/lease"
)

// imageIDPattern is imageconfig's: every image id a Lease is taken for.
var imageIDPattern = regexp.MustCompile(`^[0-9a-zA-Z_-]{1,64}\.mvps-image$`)

// nameBeforeLabels is Name as it was before each dot-separated part was
// trimmed: the names it gave that the API server accepts must not change,
// or a restarted or upgraded provisioner would not find the Lease its
// predecessor holds.
func nameBeforeLabels(imageID string) string {
	sum := sha256.Sum256([]byte(imageID))
	var b strings.Builder
	for _, r := range strings.ToLower(imageID) {
		if r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r == '.' {
			b.WriteRune(r)
		} else {
			b.WriteByte('-')
		}
	}
	clean := b.String()
	const max = 253 - len("mvps-") - 11
	if len(clean) > max {
		clean = clean[:max]
	}
	clean = strings.Trim(clean, "-.")
	return "mvps-" + clean + "-" + hex.EncodeToString(sum[:5])
}

// checkName checks Name(id): an object name the API server accepts, the
// same name as before whenever that one was accepted too, and ending in the
// hash of the whole id.
func checkName(t *testing.T, id string) string {
	t.Helper()
	name := lease.Name(id)
	if errs := validation.IsDNS1123Subdomain(name); len(errs) > 0 {
		t.Errorf("Name(%q) = %q, not a valid object name: %v", id, name, errs)
	}
	if old := nameBeforeLabels(id); len(validation.IsDNS1123Subdomain(old)) == 0 && name != old {
		t.Errorf("Name(%q) = %q, was %q", id, name, old)
	}
	sum := sha256.Sum256([]byte(id))
	if suffix := "-" + hex.EncodeToString(sum[:5]); !strings.HasSuffix(name, suffix) {
		t.Errorf("Name(%q) = %q, does not end in %q", id, name, suffix)
	}
	return name
}

// The examples of docs/kubernetes.md.
func TestNameExamples(t *testing.T) {
	for id, want := range map[string]string{
		"vol.mvps-image":   "mvps-vol.mvps-image-dddb19b749",
		"data_.mvps-image": "mvps-data.mvps-image-46e4de8588",
	} {
		if got := checkName(t, id); got != want {
			t.Errorf("Name(%q) = %q, want %q", id, got, want)
		}
	}
}

// Every image id names a Lease the API server accepts, also when a part of
// it between dots would begin or end with a '-' once cleaned, and two ids
// never name one Lease.
func TestNameIsAValidObjectName(t *testing.T) {
	ids := []string{
		"data_.mvps-image",
		"a-.mvps-image",
		"a_.mvps-image",
		"a--.mvps-image",
		"a-_-.mvps-image",
		"_.mvps-image",
		"-.mvps-image",
		"___.mvps-image",
		"---.mvps-image",
		"_a.mvps-image",
		"-a.mvps-image",
		"_a_.mvps-image",
		"Data_.mvps-image",
		"MiXeD_Case-.mvps-image",
		"DATA.mvps-image",
		"data.mvps-image",
		"data-.mvps-image",
		strings.Repeat("a", 64) + ".mvps-image",
		strings.Repeat("_", 64) + ".mvps-image",
		strings.Repeat("-", 64) + ".mvps-image",
		strings.Repeat("A", 63) + "_.mvps-image",
		strings.Repeat("z", 63) + "-.mvps-image",
		"_" + strings.Repeat("Q", 62) + "_.mvps-image",
		// Not image ids, but Name must cope with them too.
		"",
		".",
		"a..b",
		"a.-b-.c",
		"a._.b",
		strings.Repeat("x.-", 100),
		strings.Repeat("_", 300),
		"é.mvps-image",
	}
	seen := map[string]string{}
	for _, id := range ids {
		name := checkName(t, id)
		if other, ok := seen[name]; ok {
			t.Errorf("Name(%q) = Name(%q) = %q", id, other, name)
		}
		seen[name] = id
	}
}

// randomImageID is a random image id, often with '_' and '-' around the dot.
func randomImageID(r *rand.Rand) string {
	const alphabet = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_-"
	n := 1 + r.IntN(64)
	b := make([]byte, n)
	for i := range b {
		if r.IntN(3) == 0 {
			b[i] = "_-"[r.IntN(2)]
		} else {
			b[i] = alphabet[r.IntN(len(alphabet))]
		}
	}
	return string(b) + ".mvps-image"
}

func TestNameOfRandomImageIDs(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	seen := map[string]string{}
	for range 20000 {
		id := randomImageID(r)
		if !imageIDPattern.MatchString(id) {
			t.Fatalf("made %q, not an image id", id)
		}
		name := checkName(t, id)
		if other, ok := seen[name]; ok && other != id {
			t.Errorf("Name(%q) = Name(%q) = %q", id, other, name)
		}
		seen[name] = id
		if t.Failed() {
			return
		}
	}
}

func FuzzName(f *testing.F) {
	for _, id := range []string{"vol.mvps-image", "data_.mvps-image", "a-.mvps-image", "_.mvps-image", "a..b", ""} {
		f.Add(id)
	}
	f.Fuzz(func(t *testing.T, id string) {
		checkName(t, id)
	})
}
