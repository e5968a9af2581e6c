package attestor

import "time"

// workers runs attestations on goroutines kept from call to call. A fresh
// goroutine grows its stack on the unix attestor's buffers, and the copy
// cost more than the attestation itself (BenchmarkFetch/jwt-reused-conn:
// runtime.copystack was 3% of the CPU, the unix attestor 4x slower than
// when called from one of gRPC's stream workers, whose stacks have grown).
var workers = workerPool{jobs: make(chan func()), idle: 30 * time.Second}

// workerPool hands a job to an idle worker, or starts a new one when all
// are busy, so that an attestor that hangs never holds up another call.
// Workers exit after idle time without a job: the pool is as large as the
// attestations running at once recently, no larger.
type workerPool struct {
	jobs chan func() // unbuffered: a send succeeds only into an idle worker
	idle time.Duration
}

func (p *workerPool) run(job func()) {
	select {
	case p.jobs <- job:
	default:
		go p.work(job)
	}
}

func (p *workerPool) work(job func()) {
	job()
	timer := time.NewTimer(p.idle)
	defer timer.Stop()
	for {
		select {
		case job := <-p.jobs:
			job()
			timer.Reset(p.idle)
		case <-timer.C:
			return
		}
	}
}
