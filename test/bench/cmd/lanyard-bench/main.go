// Command lanyard-bench measures Lanyard against spire-agent side by side
// (see package bench) and prints a table, with JSON and an SVG chart under
// -out.
//
//	go run ./test/bench/cmd/lanyard-bench            # full run, ~15 min on 2 cores (as root: the SPIRE-HA section)
//	go run ./test/bench/cmd/lanyard-bench -quick     # under 2 min
//	go run ./test/bench/cmd/lanyard-bench -local     # Lanyard on its own CA vs the floor, no SPIRE
//	go run ./test/bench/cmd/lanyard-bench -ha-only   # the SPIRE-HA section alone, ~4 min
//	go run ./test/bench/cmd/lanyard-bench load -socket S -kind x509-reused-conn -clients 16
//	go run ./test/bench/cmd/lanyard-bench profile -config agent.conf   # pprof of the agent under load
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/test/bench"
	"github.com/lanyard-dev/lanyard/test/spire/spiretest"

	// The plugins `lanyard run` has, for the profile command.
	_ "github.com/lanyard-dev/lanyard/plugins/builtin"
)

func main() {
	bench.RunRole()
	if len(os.Args) > 1 {
		switch os.Args[1] {
		case "load":
			os.Exit(load(os.Args[2:]))
		case "profile":
			os.Exit(profile(os.Args[2:]))
		}
	}
	os.Exit(run())
}

// load drives one fetch workload against any Workload API socket, e.g. to
// profile an agent with perf while it runs.
func load(args []string) int {
	fs := flag.NewFlagSet("lanyard-bench load", flag.ContinueOnError)
	socket := fs.String("socket", "", "the Workload API socket")
	kind := fs.String("kind", string(bench.Reused), "the fetch workload: "+kindList())
	clients := fs.Int("clients", 16, "concurrent clients")
	window := fs.Duration("window", 10*time.Second, "how long to measure (at most 10m)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *socket == "" || *window <= 0 || *window > 10*time.Minute {
		fmt.Fprintln(os.Stderr, "lanyard-bench load: -socket is required and -window must be in (0, 10m]")
		return 2
	}
	res, err := bench.Load(context.Background(), *socket, bench.Kind(*kind), *clients, 0, *window, nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, "lanyard-bench load:", err)
		return 1
	}
	p := bench.PercentilesOf(res.Latencies)
	fmt.Printf("%s c=%d: %.0f fetches/s, p50 %s p90 %s p99 %s, %d errors %s\n",
		*kind, *clients, res.Throughput(), p.P50, p.P90, p.P99, res.Errors, res.FirstErr)
	return 0
}

func run() int {
	quick := flag.Bool("quick", false, "a short run (under 2 minutes): 1 round of 1 s, fewer entries")
	local := flag.Bool("local", false, "Lanyard on its embedded CA and the floor only; no SPIRE")
	out := flag.String("out", "results", "folder for the JSON, table and SVG chart (empty: write none)")
	lanyard := flag.String("lanyard", "", "the lanyard binary (default: build cmd/lanyard)")
	baseline := flag.String("baseline", "", "another lanyard binary to measure beside it on the fetch workloads (embedded CA), for before/after")
	rounds := flag.Int("rounds", 0, "rounds of each fetch workload (default 3, quick 1)")
	window := flag.Duration("window", 0, "measured time of each round (default 4s, quick 1s)")
	clients := flag.String("clients", "", "concurrencies, comma-separated (default 1,16,64)")
	kinds := flag.String("kinds", "", "fetch workloads, comma-separated: "+kindList())
	streams := flag.Int("streams", -1, "open streams to hold (0: skip; default 1000)")
	entries := flag.Int("entries", -1, "registration entries for the node (0: skip; default 10000, quick 2000)")
	cacheReload := flag.Duration("server-cache-reload", 0, "spire-server's experimental.cache_reload_interval (default: SPIRE's, 5s)")
	freshReload := flag.Duration("fresh-server-reload", 100*time.Millisecond, "entry-to-SVID probe against a second spire-server with this entry cache reload interval (0: skip)")
	k8sBurst := flag.Int("k8s-burst", -1, "workloads attesting at once with the k8s attestor (0: skip; default 100, quick 20)")
	k8sPods := flag.Int("k8s-pods", -1, "pods the kubelet lists in the k8s burst (default 500, quick 100)")
	ha := flag.Bool("ha", true, "the SPIRE-HA section: two spire-servers on one PostgreSQL behind one name (needs root and PostgreSQL: make postgres)")
	haOnly := flag.Bool("ha-only", false, "run the SPIRE-HA section alone")
	haAgents := flag.Int("ha-agents", -1, "agents of each kind attested to the HA pair (0: skip; default 50, quick 10)")
	haRounds := flag.Int("ha-rounds", -1, "kills of the server in use in the HA failover (0: skip; default 5, quick 2)")
	flag.Parse()

	cfg := bench.DefaultConfig(*quick)
	cfg.LocalOnly = *local
	cfg.BaselineBin = *baseline
	cfg.ServerCacheReload = *cacheReload
	cfg.FreshServerReload = *freshReload
	if *rounds > 0 {
		cfg.Rounds = *rounds
	}
	if *window > 0 {
		cfg.Window = *window
	}
	if *clients != "" {
		cfg.Clients = nil
		for _, c := range strings.Split(*clients, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(c))
			if err != nil || n < 1 {
				fmt.Fprintf(os.Stderr, "lanyard-bench: -clients: %q is not a positive number\n", c)
				return 2
			}
			cfg.Clients = append(cfg.Clients, n)
		}
	}
	if *kinds != "" {
		cfg.Kinds = nil
		for _, k := range strings.Split(*kinds, ",") {
			kind := bench.Kind(strings.TrimSpace(k))
			if !strings.Contains(kindList(), string(kind)) {
				fmt.Fprintf(os.Stderr, "lanyard-bench: -kinds: unknown workload %q (known: %s)\n", kind, kindList())
				return 2
			}
			cfg.Kinds = append(cfg.Kinds, kind)
		}
	}
	if *streams >= 0 {
		cfg.Streams = *streams
	}
	if *entries >= 0 {
		cfg.Entries = *entries
		cfg.Live = min(cfg.Live, cfg.Entries)
	}
	if *k8sBurst >= 0 {
		cfg.K8sBurst = *k8sBurst
	}
	if *k8sPods >= 0 {
		cfg.K8sPods = max(*k8sPods, cfg.K8sBurst+1)
	}
	if *haAgents >= 0 {
		cfg.HAAgents = *haAgents
	}
	if *haRounds >= 0 {
		cfg.HAFailoverRounds = *haRounds
	}
	if !*ha {
		cfg.HAAgents, cfg.HAFailoverRounds = 0, 0
	}
	cfg.HAOnly = *haOnly

	prog := spiretest.NewProgram("lanyard-bench", os.Stderr)
	var report *bench.Report
	err := prog.Run(func(tb testing.TB) {
		cfg.LanyardBin = *lanyard
		if cfg.LanyardBin == "" {
			fmt.Fprintln(os.Stderr, "building lanyard")
			bin, err := bench.BuildLanyard(tb.TempDir())
			if err != nil {
				tb.Fatal(err)
			}
			cfg.LanyardBin = bin
		}
		report = bench.Run(tb, cfg)
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println()
	report.WriteTable(os.Stdout)
	if *out != "" {
		paths, err := report.WriteFiles(*out)
		if err != nil {
			fmt.Fprintln(os.Stderr, "lanyard-bench: writing results:", err)
			return 1
		}
		fmt.Printf("\nwrote %s\n", strings.Join(paths, ", "))
	}
	if missed := report.Missed(); len(missed) > 0 {
		fmt.Printf("%d of %d targets missed\n", len(missed), len(report.Checks))
	}
	return 0
}

// profile runs Lanyard's agent in this process under a fetch workload and
// writes pprof profiles of it.
func profile(args []string) int {
	fs := flag.NewFlagSet("lanyard-bench profile", flag.ContinueOnError)
	var pc bench.ProfileConfig
	fs.StringVar(&pc.Config, "config", "", "a lanyard config file (embedded CA or SPIRE Server), or \"floor\" for the floor server")
	fs.BoolVar(&pc.ExpandEnv, "expandEnv", false, "expand $VAR and ${VAR} in the config, as lanyard run -expandEnv")
	kind := fs.String("kind", string(bench.Reused), "the fetch workload: "+kindList())
	fs.IntVar(&pc.Clients, "clients", 16, "concurrent clients")
	fs.DurationVar(&pc.Window, "window", 10*time.Second, "how long to load the agent (at most 10m)")
	fs.StringVar(&pc.CPUOut, "cpuprofile", "cpu.prof", "CPU profile file")
	fs.StringVar(&pc.HeapOut, "memprofile", "mem.prof", "heap profile file")
	spireEntries := fs.Int("spire-entries", 0, "instead of -config: run a spire-server with this many entries for the node and profile Lanyard as its agent")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if (pc.Config == "") == (*spireEntries == 0) {
		fmt.Fprintln(os.Stderr, "lanyard-bench profile: give -config or -spire-entries")
		return 2
	}
	pc.Kind = bench.Kind(*kind)
	// A finer heap sample than the default one per 512 KiB: the agent's
	// heap is a few MB.
	runtime.MemProfileRate = 4096
	var line string
	var err error
	if *spireEntries > 0 {
		prog := spiretest.NewProgram("lanyard-bench profile", os.Stderr)
		if perr := prog.Run(func(tb testing.TB) {
			line, err = bench.ProfileWithSPIRE(tb, pc, *spireEntries)
		}); perr != nil {
			err = perr
		}
	} else {
		line, err = bench.Profile(pc)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "lanyard-bench profile:", err)
		return 1
	}
	fmt.Println(line)
	fmt.Printf("wrote %s and %s: go tool pprof -top %s\n", pc.CPUOut, pc.HeapOut, pc.CPUOut)
	return 0
}

func kindList() string {
	var s []string
	for _, k := range bench.Kinds {
		s = append(s, string(k))
	}
	return strings.Join(s, ",")
}
