package agent

import (
	"errors"
	"testing"
	"time"
)

func TestHealthSource(t *testing.T) {
	clock := &fakeClock{now: time.Now()}
	h := newHealthSource(clock.Now)
	down := clock.Now()
	h.reportUpstream(errors.New("refused"))
	clock.Set(down.Add(time.Minute))
	h.reportUpstream(errors.New("timed out"))
	var got Health
	h.fill(&got)
	if h.upstreamUp() || got.UpstreamErr == nil || got.UpstreamErr.Error() != "timed out" || !got.UpstreamDownSince.Equal(down) {
		t.Errorf("while down: %+v, up %v; want the last error, down since the first", got, h.upstreamUp())
	}
	h.reportUpstream(nil)
	h.reportSave("/b", errors.New("disk full"))
	h.reportSave("/a", errors.New("read-only"))
	got = Health{}
	h.fill(&got)
	if !h.upstreamUp() || got.UpstreamErr != nil || !got.UpstreamDownSince.IsZero() {
		t.Errorf("after recovery: %+v", got)
	}
	if got.SaveErr == nil || got.SaveErr.Error() != "read-only\ndisk full" || !got.Degraded() {
		t.Errorf("save errors %v, want both, by path", got.SaveErr)
	}
	h.reportSave("/a", nil)
	h.reportSave("/b", nil)
	got = Health{}
	h.fill(&got)
	if got.Degraded() {
		t.Errorf("degraded after every save succeeded: %q", got.Reason())
	}
}
