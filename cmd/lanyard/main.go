// Command lanyard is a SPIFFE Workload API node agent, a drop-in for
// spire-agent. `lanyard run` starts the agent; the other subcommands are
// clients of a running agent or check a config.
package main

import (
	"fmt"
	"io"
	"os"

	// The compiled-in plugins register themselves by name.
	_ "github.com/lanyard-dev/lanyard/plugins/builtin"
)

const usage = `Usage: lanyard <command> [flags]

Commands:
  run                  run the agent (-config FILE)
  validate             check a config file without starting (-config FILE)
  api fetch x509       fetch X.509-SVIDs from a running agent (-write DIR)
  api fetch jwt        fetch JWT-SVIDs (-audience A)
  api validate jwt     validate a JWT-SVID (-audience A -svid TOKEN)
  api watch            watch X.509-SVID updates
  helper               keep SVIDs as files, spiffe-helper's config (-config FILE)
  healthcheck          check that the agent is serving
  status               the agent's identity, upstream and the workloads it serves (-json)
  version              print the version

Run 'lanyard <command> -h' for a command's flags.
`

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	switch args[0] {
	case "run":
		return runAgent(args[1:], stderr)
	case "validate":
		return runValidate(args[1:], stdout, stderr)
	case "api":
		return runAPI(args[1:], stdout, stderr)
	case "helper":
		return runHelper(args[1:], stdout, stderr)
	case "healthcheck":
		return runHealthcheck(args[1:], stdout, stderr)
	case "status":
		return runStatus(args[1:], stdout, stderr)
	case "version", "-version", "--version":
		fmt.Fprintln(stdout, "lanyard", version)
		return 0
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "lanyard: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
}
