// Command restart asks a running baton supervisor for a graceful restart
// and exits with a code that says how it went; see `restart --help`.
package main

import (
	"os"

	"github.com/baton-run/baton/internal/cli"
)

func main() {
	os.Exit(cli.RestartMain(os.Args[1:], os.Getenv, os.Stdout, os.Stderr))
}
