// Command baton is a graceful-restart supervisor: it holds a server's
// listening sockets and replaces one generation of the server with the
// next without refusing a connection.
package main

import (
	"fmt"
	"os"

	"github.com/baton-run/baton/internal/cli"
	"github.com/baton-run/baton/internal/cli/run"
	"github.com/baton-run/baton/internal/supervisor"
)

const usage = `baton: graceful-restart supervisor for network servers

Usage:
  baton run [flags] -- COMMAND [ARGS...]   supervise COMMAND
  baton restart [flags]                    ask a running supervisor to restart
                                           (--canary PERCENT: as a canary)
  baton promote [flags]                    make the canary the working generation
  baton rollback [flags]                   drain the canary
  baton status [flags]                     show a running supervisor's generations
  baton version                            the version (also --version)
  baton help                               this text

Run 'baton COMMAND -h' for a command's flags.
`

func main() {
	if code, ok := supervisor.Shim(os.Args[1:]); ok {
		os.Exit(code)
	}
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	args := os.Args[2:]
	switch os.Args[1] {
	case "run":
		os.Exit(run.Main(args, run.OSEnv(), os.Stderr))
	case "restart":
		os.Exit(cli.RestartMain(args, os.Getenv, os.Stdout, os.Stderr))
	case "status":
		os.Exit(cli.StatusMain(args, os.Getenv, os.Stdout, os.Stderr))
	case "promote":
		os.Exit(cli.PromoteMain(args, os.Getenv, os.Stdout, os.Stderr))
	case "rollback":
		os.Exit(cli.RollbackMain(args, os.Getenv, os.Stdout, os.Stderr))
	case "version", "--version", "-version":
		fmt.Println(cli.Version("baton"))
	case "help", "-h", "--help":
		fmt.Print(usage)
	default:
		fmt.Fprintf(os.Stderr, "baton: unknown command %q\n\n%s", os.Args[1], usage)
		os.Exit(2)
	}
}
