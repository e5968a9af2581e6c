package k8s

import (
	"errors"
	"regexp"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/util/validation"
)

var kubeletUID = regexp.MustCompile(`^([0-9a-f]{32}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$`)

// FuzzValidatePodReference checks the reference's checks against
// Kubernetes' own (k8s.io/apimachinery's validation, which the agent does
// not link), and that a valid reference names a pod by name, by UID, or
// both.
func FuzzValidatePodReference(f *testing.F) {
	f.Add("team-1", "web-1-8c4bba9e7c-93674", "7279e37c-ebf9-a9b8-e62c-8cb2027dc6fa")
	f.Add("kube-system", "etcd.node-a", "")
	f.Add("", "", "0123456789abcdef0123456789abcdef")
	f.Add("a-", "a.-b", "7279e37c_ebf9_a9b8_e62c_8cb2027dc6fa")
	f.Add("A", "web..x", "{7279e37c-ebf9-a9b8-e62c-8cb2027dc6fa}")
	f.Add(strings.Repeat("a", 64), strings.Repeat("a", 64)+".b", "")
	f.Add(strings.Repeat("a", 63), strings.Repeat("a.", 126)+"a", "")
	f.Add("a.b", strings.Repeat("a.", 126)+"ab", "")
	f.Fuzz(func(t *testing.T, namespace, name, uid string) {
		if got, want := isDNSLabel(namespace), len(validation.IsDNS1123Label(namespace)) == 0; got != want {
			t.Fatalf("isDNSLabel(%q) = %v, Kubernetes says %v", namespace, got, want)
		}
		if got, want := isDNSSubdomain(name), len(validation.IsDNS1123Subdomain(name)) == 0; got != want {
			t.Fatalf("isDNSSubdomain(%q) = %v, Kubernetes says %v", name, got, want)
		}
		if got, want := isPodUID(uid), kubeletUID.MatchString(uid); got != want {
			t.Fatalf("isPodUID(%q) = %v, want %v", uid, got, want)
		}
		err := validatePodReference(namespace, name, uid)
		if err != nil {
			if !errors.Is(err, ErrInvalidPodReference) {
				t.Fatalf("validatePodReference(%q, %q, %q) = %v, not ErrInvalidPodReference", namespace, name, uid, err)
			}
			return
		}
		byName := namespace != "" && name != ""
		if !byName && uid == "" || (namespace == "") != (name == "") {
			t.Fatalf("validatePodReference(%q, %q, %q) accepted a reference that names nothing, or half a name", namespace, name, uid)
		}
	})
}
