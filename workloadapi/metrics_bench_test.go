package workloadapi

import "testing"

// BenchmarkFetchMetrics is BenchmarkFetch with the telemetry block, so
// that every call goes through the metrics interceptors and the counting
// listener: the two compare what metrics cost the fetch path.
func BenchmarkFetchMetrics(b *testing.B) {
	socket, a := benchAgentWith(b, benchConf+"telemetry {\n    Prometheus {\n        port = 9988\n    }\n}\n")
	if a.Metrics() == nil {
		b.Fatal("the telemetry block gave the agent no metrics")
	}
	benchFetch(b, socket)
}
