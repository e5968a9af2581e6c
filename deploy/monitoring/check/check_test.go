package check

import (
	"encoding/json"
	"log/slog"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/lanyard-dev/lanyard/telemetry"
	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/rulefmt"
	"github.com/prometheus/prometheus/promql/parser"
)

const (
	rulesFile     = "../lanyard-alerts.yaml"
	dashboardFile = "../lanyard-dashboard.json"
)

// promql is Prometheus's parser with its default options.
var promql = parser.NewParser(parser.Options{})

// exposed is every series name Lanyard serves: each definition, with a
// histogram's _bucket, _count and _sum.
func exposed() map[string]bool {
	names := map[string]bool{}
	for _, d := range telemetry.Defs() {
		names[d.Name] = true
		if d.Kind == telemetry.Histogram {
			for _, suffix := range []string{"_bucket", "_count", "_sum"} {
				names[d.Name+suffix] = true
			}
		}
	}
	return names
}

// checkExpr parses expr and reports the metric names it uses that Lanyard
// does not expose; it fails when expr uses none.
func checkExpr(t *testing.T, where, expr string) {
	t.Helper()
	e, err := promql.ParseExpr(expr)
	if err != nil {
		t.Errorf("%s: %q does not parse: %v", where, expr, err)
		return
	}
	known := exposed()
	used := 0
	parser.Inspect(e, func(node parser.Node, _ []parser.Node) error {
		vs, ok := node.(*parser.VectorSelector)
		if !ok {
			return nil
		}
		name := vs.Name
		if name == "" {
			t.Errorf("%s: %q selects series without naming a metric", where, expr)
			return nil
		}
		used++
		standard := slices.ContainsFunc(telemetry.StandardPrefixes, func(p string) bool { return strings.HasPrefix(name, p) })
		if !known[name] && !standard {
			t.Errorf("%s: %q names %s, which Lanyard does not expose", where, expr, name)
		}
		return nil
	})
	if used == 0 {
		t.Errorf("%s: %q uses no metric", where, expr)
	}
}

func TestAlertRulesParseAndNameExposedMetrics(t *testing.T) {
	groups, errs := rulefmt.ParseFile(rulesFile, false, model.UTF8Validation, promql, slog.New(slog.DiscardHandler))
	for _, err := range errs {
		t.Errorf("%s: %v", rulesFile, err)
	}
	if groups == nil {
		t.Fatal("no rule groups")
	}
	alerts := 0
	for _, g := range groups.Groups {
		for _, r := range g.Rules {
			if r.Alert == "" {
				continue
			}
			alerts++
			checkExpr(t, r.Alert, r.Expr)
		}
	}
	// What the issue asks the rules to catch.
	for _, want := range []string{"lanyard_svid_earliest_expiry_seconds", "lanyard_upstream_down_seconds", "lanyard_workload_attestor_failures_total"} {
		body, err := os.ReadFile(rulesFile)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(body), want) {
			t.Errorf("no rule watches %s", want)
		}
	}
	if alerts < 3 {
		t.Fatalf("%d alerts", alerts)
	}
}

// grafanaVariables are the dashboard's variables that are not PromQL,
// with a value of the right kind.
var grafanaVariables = strings.NewReplacer("$__rate_interval", "5m", "$__interval", "1m", "$__range", "1h")

func TestDashboardQueriesParseAndNameExposedMetrics(t *testing.T) {
	body, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Title  string  `json:"title"`
		Panels []panel `json:"panels"`
	}
	if err := json.Unmarshal(body, &dash); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	queries := 0
	var walk func([]panel)
	walk = func(panels []panel) {
		for _, p := range panels {
			for _, target := range p.Targets {
				queries++
				checkExpr(t, p.Title, grafanaVariables.Replace(target.Expr))
			}
			walk(p.Panels)
		}
	}
	walk(dash.Panels)
	if queries == 0 {
		t.Fatal("the dashboard has no queries")
	}
}

type panel struct {
	Title   string `json:"title"`
	Targets []struct {
		Expr string `json:"expr"`
	} `json:"targets"`
	Panels []panel `json:"panels"` // a collapsed row's
}
