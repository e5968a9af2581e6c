package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/filedelivery"
)

// runHelper is `lanyard helper`: spiffe-helper's command line (-config,
// -daemon-mode, -version) over spiffe-helper's config file.
func runHelper(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("helper", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, "Usage: lanyard helper [-config FILE] [-daemon-mode=false]\n\n"+
			"Keeps SVIDs and bundles as files, reading spiffe-helper's config file unchanged.\n\n")
		fs.PrintDefaults()
	}
	configFile := fs.String("config", "helper.conf", "Configuration file path")
	daemonFlag := fs.Bool("daemon-mode", true, "Keep the files up to date (true) or fetch once and exit (false); overrides daemon_mode")
	showVersion := fs.Bool("version", false, "Print the version")
	if err := fs.Parse(args); err != nil {
		if err == flag.ErrHelp {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "lanyard helper: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	if *showVersion {
		fmt.Fprintln(stdout, "lanyard", version)
		return 0
	}
	var daemonMode *bool
	fs.Visit(func(f *flag.Flag) {
		if f.Name == "daemon-mode" {
			daemonMode = daemonFlag
		}
	})
	log := hclog.New(&hclog.LoggerOptions{Name: "helper", Output: stderr, Level: hclog.Info})
	cfg, err := filedelivery.Load(*configFile, daemonMode, os.Getenv)
	if err != nil {
		fmt.Fprintf(stderr, "lanyard helper: %v\n", err)
		return 1
	}
	for _, key := range cfg.Ignored() {
		log.Warn("daemon mode is off: this key is ignored", "key", key)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	h, err := filedelivery.New(ctx, cfg, log)
	if err != nil {
		fmt.Fprintf(stderr, "lanyard helper: %v\n", err)
		return 1
	}
	defer h.Close()
	if !cfg.DaemonMode {
		if err := h.RunOnce(ctx); err != nil {
			log.Error("fetching once failed", "error", err)
			return 1
		}
		return 0
	}
	if err := h.RunDaemon(ctx); err != nil {
		log.Error("stopped", "error", err)
		return 1
	}
	return 0
}
