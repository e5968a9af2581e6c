package agent

import (
	"math/rand/v2"
	"time"
)

// Backoff yields capped exponential delays with jitter in [d/2, d], for
// retries against an upstream.
type Backoff struct {
	base, max, cur time.Duration
}

// NewBackoff returns a Backoff starting at base and capped at max.
func NewBackoff(base, max time.Duration) *Backoff {
	return &Backoff{base: base, max: max, cur: base}
}

// Next returns the delay before the next try.
func (b *Backoff) Next() time.Duration {
	d := b.cur
	b.cur = min(b.cur*2, b.max)
	return d/2 + rand.N(d/2+1)
}

// Reset starts over after a success.
func (b *Backoff) Reset() { b.cur = b.base }
