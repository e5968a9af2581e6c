// Package check tests deploy/monitoring: every expression of the alert
// rules and of the Grafana dashboard parses as PromQL and names only
// metrics Lanyard exposes (telemetry.Defs). It is a module of its own so
// that Prometheus stays out of the agent's go.mod; make test runs it.
package check
