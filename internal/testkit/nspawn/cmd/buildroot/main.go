// Command buildroot builds the Debian root the systemd tests boot (see
// package nspawn), so that CI can build it in the background while other
// tests run; the tests wait for it through the cache's lock.
package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/baton-run/baton/internal/testkit/nspawn"
)

func main() {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	logf := func(format string, args ...any) { fmt.Fprintf(os.Stderr, format+"\n", args...) }
	root, err := nspawn.RootDir(ctx, nspawn.Suite(), logf)
	if err != nil {
		fmt.Fprintln(os.Stderr, "buildroot:", err)
		os.Exit(1)
	}
	fmt.Println(root)
}
