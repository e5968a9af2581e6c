package workloadapi

import (
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/attestor/selector"
)

func TestDenialLimiterIsPerUIDAndBounded(t *testing.T) {
	var d denialLimiter
	at := time.Unix(1_000_000, 0)
	if ok, _ := d.allow(1000, at); !ok {
		t.Fatal("the first denial of a uid is not logged")
	}
	if ok, _ := d.allow(1000, at.Add(time.Second)); ok {
		t.Fatal("a second denial within the interval is logged")
	}
	if ok, _ := d.allow(1001, at.Add(time.Second)); !ok {
		t.Fatal("another uid's denial is held back")
	}
	ok, suppressed := d.allow(1000, at.Add(denialLogEvery))
	if !ok || suppressed != 1 {
		t.Fatalf("after the interval: logged %v with %d not logged, want true and 1", ok, suppressed)
	}

	// Past maxDenialUIDs, new uids share one slot, until old ones age out.
	for uid := uint32(10_000); len(d.byUID) < maxDenialUIDs; uid++ {
		d.allow(uid, at)
	}
	if len(d.byUID) > maxDenialUIDs {
		t.Fatalf("the limiter holds %d uids, the bound is %d", len(d.byUID), maxDenialUIDs)
	}
	if ok, _ := d.allow(99_999, at.Add(time.Second)); !ok {
		t.Fatal("the overflow slot's first denial is not logged")
	}
	if ok, _ := d.allow(99_998, at.Add(2*time.Second)); ok {
		t.Fatal("the overflow slot logged twice within the interval")
	}
	later := at.Add(2 * denialLogEvery)
	if ok, _ := d.allow(99_997, later); !ok {
		t.Fatal("a new uid is not logged once the old ones aged out")
	}
	if len(d.byUID) > maxDenialUIDs {
		t.Fatalf("the limiter holds %d uids after the sweep", len(d.byUID))
	}
}

func TestLoggedSelectorsWithholdEnvironmentValues(t *testing.T) {
	got := loggedSelectors([]selector.Selector{
		{Type: "docker", Value: "env:AWS_SECRET_ACCESS_KEY=hunter2"},
		{Type: "unix", Value: "uid:1000"},
	})
	if strings.Contains(got, "hunter2") || !strings.Contains(got, "docker:env:AWS_SECRET_ACCESS_KEY=") || !strings.Contains(got, "unix:uid:1000") {
		t.Fatalf("loggedSelectors = %q", got)
	}
	if got := loggedSelectors(nil); !strings.Contains(got, "none") {
		t.Fatalf("no selectors: %q", got)
	}
	many := make([]selector.Selector, maxLoggedSelectors+5)
	for i := range many {
		many[i] = selector.Selector{Type: "k8s", Value: "label:x"}
	}
	if got := loggedSelectors(many); strings.Count(got, "k8s:") != maxLoggedSelectors || !strings.HasSuffix(got, "and more") {
		t.Fatalf("a long list is not cut: %d shown", strings.Count(got, "k8s:"))
	}
}
