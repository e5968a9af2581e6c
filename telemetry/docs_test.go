package telemetry

import (
	"os"
	"strings"
	"testing"
)

// docs/observability.md has a row for every metric, with its type and
// labels as defined.
func TestDocsListEveryMetric(t *testing.T) {
	body, err := os.ReadFile("../docs/observability.md")
	if err != nil {
		t.Fatal(err)
	}
	rows := map[string]string{}
	for line := range strings.Lines(string(body)) {
		if name, ok := strings.CutPrefix(line, "| `"); ok {
			if i := strings.IndexByte(name, '`'); i > 0 {
				rows[name[:i]] = line
			}
		}
	}
	for _, d := range Defs() {
		row, ok := rows[d.Name]
		if !ok {
			t.Errorf("docs/observability.md has no row for %s", d.Name)
			continue
		}
		cells := strings.Split(row, "|")
		if len(cells) < 5 || strings.TrimSpace(cells[2]) != string(d.Kind) {
			t.Errorf("%s: the row does not give its type %s: %s", d.Name, d.Kind, row)
			continue
		}
		for _, l := range d.Labels {
			if !strings.Contains(cells[3], "`"+l+"`") {
				t.Errorf("%s: the row does not list its label %s", d.Name, l)
			}
		}
	}
}
