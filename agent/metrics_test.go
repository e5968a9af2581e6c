package agent

import (
	"errors"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/lanyard-dev/lanyard/telemetry"
	"github.com/lanyard-dev/lanyard/telemetry/metrictest"
)

// The SVID gauges are read from the store at scrape, by trust domain; the
// rotator counts renewals and their failures.
func TestSVIDAndRenewalMetrics(t *testing.T) {
	c, up, clock := newClockedCache(t)
	metrics := telemetry.New()
	c.observe(metrics)
	metrics.Register(&svidCollector{store: c.store, now: c.now})
	td := map[string]string{"trust_domain": "example.org"}
	value := func(name string) (float64, bool) {
		return metrictest.Gather(t, metrics.Registry()).Value(name, td)
	}

	hold(c, up, entryA())
	if _, ok := value(telemetry.SVIDs.Name); ok {
		t.Fatal("SVIDs reported before any was signed")
	}
	_, first := fetchFirst(t, c, up, entryA())
	if v, _ := value(telemetry.SVIDs.Name); v != 1 {
		t.Fatalf("SVIDs held: %v, want 1", v)
	}
	if v, _ := value(telemetry.SVIDEarliestExpiry.Name); v != first.NotAfter.Sub(clock.Now()).Seconds() {
		t.Errorf("earliest expiry %v s, want %v", v, first.NotAfter.Sub(clock.Now()).Seconds())
	}
	if v, _ := value(telemetry.SVIDShortestTTL.Name); v != first.NotAfter.Sub(first.NotBefore).Seconds() {
		t.Errorf("shortest TTL %v s, want %v", v, first.NotAfter.Sub(first.NotBefore).Seconds())
	}

	up.SetFail(errors.New("upstream down"))
	clock.Set(first.RenewAt.Add(time.Second))
	startRotation(t, c)
	testkit.WaitFor(t, waitLimit, "a failed renewal to be counted", func() bool {
		v, _ := value(telemetry.SVIDRenewalFailure.Name)
		return v >= 1
	})
	up.SetFail(nil)
	testkit.WaitFor(t, waitLimit, "the retried renewal to be counted", func() bool {
		v, _ := value(telemetry.SVIDRenewals.Name)
		return v == 1
	})
	// The renewed SVID is nobody's yet: it is not one the rotator renews.
	if _, ok := value(telemetry.SVIDEarliestExpiry.Name); ok {
		t.Error("an SVID no workload has counts in the earliest expiry")
	}
}
