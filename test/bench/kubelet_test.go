package bench

import (
	"encoding/json"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
)

// TestKubeletListsContainersOverTime: the bench's kubelet serves a pod
// list the API's types decode, listing the burst's container IDs only from
// their step on.
func TestKubeletListsContainersOverTime(t *testing.T) {
	works := []podWorkload{newPodWorkload(0), newPodWorkload(1)}
	others := benchPods(3, nil)
	lists := burstTimeline(benchPods(2, works), others)
	if len(lists) != burstSteps+1 {
		t.Fatalf("%d lists, want %d", len(lists), burstSteps+1)
	}
	k, err := startKubelet(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer k.close()
	get := func() corev1.PodList {
		t.Helper()
		resp, err := http.Get("http://127.0.0.1:" + strconv.Itoa(k.port) + "/pods")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		var list corev1.PodList
		d := json.NewDecoder(strings.NewReader(string(b)))
		d.DisallowUnknownFields()
		if err := d.Decode(&list); err != nil {
			t.Fatalf("the pod list does not decode as a PodList: %v", err)
		}
		return list
	}
	// A step of 0 serves the first list for good.
	if err := k.setTimeline(0, lists...); err != nil {
		t.Fatal(err)
	}
	first := get()
	if len(first.Items) != 5 {
		t.Fatalf("%d pods, want 5", len(first.Items))
	}
	for _, p := range first.Items[:2] {
		if p.Status.Phase != corev1.PodPending || p.Status.ContainerStatuses[0].ContainerID != "" {
			t.Errorf("burst pod %s is listed with its container before it started: %+v", p.Name, p.Status)
		}
	}
	if err := k.setTimeline(0, lists[len(lists)-1]); err != nil {
		t.Fatal(err)
	}
	last := get()
	for i, p := range last.Items[:2] {
		if got, want := p.Status.ContainerStatuses[0].ContainerID, "containerd://"+works[i].ContainerID; got != want || p.UID != works[i].UID || p.Spec.ServiceAccountName != works[i].ServiceAccount {
			t.Errorf("burst pod %d: container %q uid %q sa %q, want %q %q %q", i, got, p.UID, p.Spec.ServiceAccountName, want, works[i].UID, works[i].ServiceAccount)
		}
	}
	if requests, bytes := k.counts(); requests != 2 || bytes == 0 {
		t.Errorf("counted %d requests, %d bytes; want 2 and some", requests, bytes)
	}
}
