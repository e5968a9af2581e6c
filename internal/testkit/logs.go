package testkit

import (
	"bytes"
	"sync"
	"testing"

	"github.com/hashicorp/go-hclog"
)

// Buffer collects output written from many goroutines: a logger's, or a
// process's. The zero value keeps everything.
type Buffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
	// Limit, when set, is the size past which writes are dropped, for
	// output as long as a benchmark run.
	Limit int
}

func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.Limit > 0 && b.buf.Len() > b.Limit {
		return len(p), nil
	}
	return b.buf.Write(p)
}

func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Reset drops what was written.
func (b *Buffer) Reset() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf.Reset()
}

// NewLogger is a logger named "test" that writes at level and above to a
// new Buffer, which it returns for assertions on what was logged.
func NewLogger(level hclog.Level) (hclog.Logger, *Buffer) {
	buf := &Buffer{}
	return hclog.New(&hclog.LoggerOptions{Name: "test", Level: level, Output: buf}), buf
}

// AgentLogger is a debug logger whose output the test prints if it fails.
func AgentLogger(t testing.TB) (hclog.Logger, *Buffer) {
	log, logs := NewLogger(hclog.Debug)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("agent log:\n%s", logs.String())
		}
	})
	return log, logs
}
