package k8s

import (
	"bytes"
	"encoding/json"
	"io"
	"runtime"
	"testing"

	corev1 "k8s.io/api/core/v1"
)

func liveHeap() uint64 {
	// Twice: a sync.Pool's victim cache (encoding/json's buffers) lives
	// through one collection.
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// peakReader measures the live heap at every 8th read of the body (a
// collection each time is slow): for a streamed decode, the largest is
// about the decode's peak.
type peakReader struct {
	r     io.Reader
	peak  uint64
	reads int
}

func (p *peakReader) Read(b []byte) (int, error) {
	p.reads++
	if p.reads%8 != 0 {
		return p.r.Read(b)
	}
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	p.peak = max(p.peak, ms.HeapAlloc)
	return p.r.Read(b)
}

// TestDecodeMemory500 measures the live heap of decoding a 500-pod list
// both ways (go test -run DecodeMemory -v prints the figures).
func TestDecodeMemory500(t *testing.T) {
	if testing.Short() {
		t.Skip("forces a GC at every read")
	}
	data := podListJSON(testPods(500))
	sink = nil
	base := liveHeap()

	pr := &peakReader{r: bytes.NewReader(data)}
	list, err := decodePodList(pr, func(string, ...any) {})
	if err != nil {
		t.Fatal(err)
	}
	streamedKept := liveHeap() - base
	runtime.KeepAlive(list)
	streamedPeak := max(pr.peak-base, streamedKept)
	list = nil

	base = liveHeap()
	body, err := io.ReadAll(bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	var full corev1.PodList
	if err := json.Unmarshal(body, &full); err != nil {
		t.Fatal(err)
	}
	fullPeak := liveHeap() - base // the body and the objects, both alive at the end of Unmarshal
	runtime.KeepAlive(body)
	body = nil
	fullKept := liveHeap() - base
	runtime.KeepAlive(&full)

	t.Logf("500-pod list: %d bytes of JSON", len(data))
	t.Logf("streamed into pod: peak live %d KiB, kept %d KiB", streamedPeak>>10, streamedKept>>10)
	t.Logf("corev1.PodList:    peak live %d KiB, kept %d KiB", fullPeak>>10, fullKept>>10)
	if 2*streamedPeak > fullPeak {
		t.Errorf("the streamed decode's peak (%d) is not under half the full decode's (%d)", streamedPeak, fullPeak)
	}
}
