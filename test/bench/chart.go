package bench

import (
	"fmt"
	"html"
	"math"
	"strings"
)

// The chart is plain SVG written here: three panels of grouped bars
// (throughput; latency percentiles on a log scale; memory), one colour per
// target.

var targetColors = map[string]string{
	NameLanyard:  "#2b7bba",
	NameSpire:    "#e07b39",
	NameFloor:    "#9a9a9a",
	NameBaseline: "#7fb3d9",
}

const (
	chartW     = 1000
	panelH     = 250
	marginL    = 70
	marginR    = 20
	panelTop   = 40 // room for the panel title
	panelAxisH = 50 // room for group labels under the plot
)

type svg struct{ b strings.Builder }

func (s *svg) f(format string, args ...any) { fmt.Fprintf(&s.b, format, args...) }

func (s *svg) text(x, y float64, anchor, style, t string) {
	s.f(`<text x="%.1f" y="%.1f" text-anchor="%s" %s>%s</text>`+"\n", x, y, anchor, style, html.EscapeString(t))
}

// group is one cluster of bars: a label and one value per target (NaN:
// no bar). marks are extra horizontal ticks per bar (percentiles).
type group struct {
	label  string
	values []float64
	marks  [][]float64
}

// panel draws grouped bars in the band starting at y0. A log scale needs
// positive values.
func (s *svg) panel(y0 float64, title, unit string, names []string, groups []group, logScale bool) {
	plotTop, plotBottom := y0+panelTop, y0+panelH-panelAxisH
	plotL, plotR := float64(marginL), float64(chartW-marginR)
	s.text(plotL, y0+22, "start", `font-size="15" font-weight="bold"`, title)

	maxV, minV := 0.0, math.Inf(1)
	for _, g := range groups {
		for _, v := range g.values {
			if !math.IsNaN(v) && v > 0 {
				maxV, minV = math.Max(maxV, v), math.Min(minV, v)
			}
		}
	}
	if maxV == 0 {
		s.text((plotL+plotR)/2, (plotTop+plotBottom)/2, "middle", `font-size="13" fill="#666"`, "not measured")
		return
	}
	var lo, hi float64
	var scale func(float64) float64
	var ticks []float64
	if logScale {
		lo, hi = math.Pow(10, math.Floor(math.Log10(minV))), math.Pow(10, math.Ceil(math.Log10(maxV)))
		if lo == hi {
			hi *= 10
		}
		scale = func(v float64) float64 {
			v = math.Max(v, lo)
			return plotBottom - (math.Log10(v)-math.Log10(lo))/(math.Log10(hi)-math.Log10(lo))*(plotBottom-plotTop)
		}
		for t := lo; t <= hi*1.0001; t *= 10 {
			ticks = append(ticks, t)
		}
	} else {
		step := niceStep(maxV / 4)
		hi = math.Ceil(maxV/step) * step
		scale = func(v float64) float64 { return plotBottom - v/hi*(plotBottom-plotTop) }
		for t := 0.0; t <= hi*1.0001; t += step {
			ticks = append(ticks, t)
		}
	}
	for _, t := range ticks {
		y := scale(t)
		s.f(`<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#e4e4e4"/>`+"\n", plotL, y, plotR, y)
		s.text(plotL-6, y+4, "end", `font-size="11" fill="#555"`, tickLabel(t))
	}
	s.text(16, (plotTop+plotBottom)/2, "middle", fmt.Sprintf(`font-size="12" fill="#555" transform="rotate(-90 16 %.1f)"`, (plotTop+plotBottom)/2), unit)

	gw := (plotR - plotL) / float64(len(groups))
	bw := math.Min(28, gw*0.8/float64(len(names)))
	for gi, g := range groups {
		gx := plotL + gw*float64(gi) + (gw-bw*float64(len(names)))/2
		for ti, v := range g.values {
			if math.IsNaN(v) || v <= 0 {
				continue
			}
			x := gx + bw*float64(ti)
			y := scale(v)
			s.f(`<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"><title>%s %s: %s %s</title></rect>`+"\n",
				x, y, bw-2, plotBottom-y, targetColors[names[ti]], html.EscapeString(names[ti]), html.EscapeString(g.label), tickLabel(v), html.EscapeString(unit))
			if ti < len(g.marks) {
				for _, m := range g.marks[ti] {
					if m > 0 {
						my := scale(m)
						s.f(`<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#fff" stroke-width="2"/>`+"\n", x, my, x+bw-2, my)
					}
				}
			}
		}
		lines := strings.Split(g.label, "\n")
		for li, l := range lines {
			s.text(plotL+gw*(float64(gi)+0.5), plotBottom+16+14*float64(li), "middle", `font-size="11"`, l)
		}
	}
	s.f(`<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#333"/>`+"\n", plotL, plotBottom, plotR, plotBottom)
}

func niceStep(raw float64) float64 {
	if raw <= 0 {
		return 1
	}
	p := math.Pow(10, math.Floor(math.Log10(raw)))
	for _, m := range []float64{1, 2, 2.5, 5, 10} {
		if raw <= m*p {
			return m * p
		}
	}
	return 10 * p
}

func tickLabel(v float64) string {
	switch {
	case v >= 1000:
		return fmt.Sprintf("%.0fk", v/1000)
	case v >= 10:
		return fmt.Sprintf("%.0f", v)
	case v >= 1:
		return fmt.Sprintf("%.1f", v)
	default:
		return fmt.Sprintf("%.2g", v)
	}
}

// SVG draws the report's chart.
func (r *Report) SVG() string {
	var s svg
	names := r.Targets
	h := 3*panelH + 60
	s.f(`<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif">`+"\n", chartW, h, chartW, h)
	s.f(`<rect width="100%%" height="100%%" fill="#fff"/>` + "\n")
	x := float64(marginL)
	for _, n := range names {
		s.f(`<rect x="%.1f" y="8" width="14" height="14" fill="%s"/>`+"\n", x, targetColors[n])
		s.text(x+20, 20, "start", `font-size="13"`, n)
		x += 130
	}
	s.text(float64(chartW-marginR), 20, "end", `font-size="11" fill="#555"`,
		fmt.Sprintf("%d CPUs, spire %s, %s", r.Host.CPUs, r.Host.SPIRE, r.Started.Format("2006-01-02")))

	var thr, lat []group
	for _, row := range r.Fetch {
		label := fmt.Sprintf("%s\nc=%d", strings.TrimSuffix(string(row.Kind), "-conn"), row.Clients)
		tg := group{label: label}
		lg := group{label: label}
		for _, n := range names {
			st := row.Targets[n]
			if st == nil {
				tg.values = append(tg.values, math.NaN())
				lg.values = append(lg.values, math.NaN())
				lg.marks = append(lg.marks, nil)
				continue
			}
			tg.values = append(tg.values, st.Throughput)
			lg.values = append(lg.values, msf(st.Latency.P99))
			lg.marks = append(lg.marks, []float64{msf(st.Latency.P50), msf(st.Latency.P90)})
		}
		thr, lat = append(thr, tg), append(lat, lg)
	}
	s.panel(30, "Throughput", "fetches/s", names, thr, false)
	s.panel(30+panelH, "Latency: bar p99, white ticks p90 and p50 (log scale)", "ms", names, lat, true)

	mem := []group{{label: "idle"}}
	for _, n := range names {
		mem[0].values = append(mem[0].values, mbf(r.Idle[n]))
	}
	if ls := r.Streams[NameLanyard]; ls != nil && len(ls.Rounds) > 0 {
		mem = append(mem, rssGroup(fmt.Sprintf("%d open streams", ls.Streams), names, func(n string) (uint64, bool) {
			if st := r.Streams[n]; st != nil {
				return st.RSS, true
			}
			return 0, false
		}))
	}
	if le := r.Entries[NameLanyard]; le != nil && le.Entries > 0 {
		mem = append(mem, rssGroup(fmt.Sprintf("%d entries", le.Entries), names, func(n string) (uint64, bool) {
			if st := r.Entries[n]; st != nil {
				return st.RSS, true
			}
			return 0, false
		}))
	}
	s.panel(30+2*panelH, "Memory: RSS", "MB", names, mem, false)
	s.f("</svg>\n")
	return s.b.String()
}

// rssGroup is a bar group of each target's RSS in MB, NaN for a target the
// measure did not run on.
func rssGroup(label string, names []string, rss func(name string) (uint64, bool)) group {
	g := group{label: label}
	for _, n := range names {
		v := math.NaN()
		if b, ok := rss(n); ok {
			v = mbf(b)
		}
		g.values = append(g.values, v)
	}
	return g
}

// mbf is bytes in MB, NaN for none (not measured).
func mbf(b uint64) float64 {
	if b == 0 {
		return math.NaN()
	}
	return float64(b) / 1e6
}
