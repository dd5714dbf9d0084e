package e2e

import (
	"flag"
	"fmt"
	"os"
	"testing"

	"github.com/baton-run/baton/internal/testkit"
)

// bin holds the absolute paths of the binaries built once for all tests.
var bin testkit.Bins

func TestMain(m *testing.M) {
	flag.Parse()
	// Most of a test's time is spent waiting on processes and timers, not
	// on the CPU, so run more tests at once than the default GOMAXPROCS
	// unless -parallel was given.
	parallelSet := false
	flag.Visit(func(f *flag.Flag) { parallelSet = parallelSet || f.Name == "test.parallel" })
	if !parallelSet {
		_ = flag.Set("test.parallel", "6")
	}
	os.Exit(run(m))
}

func run(m *testing.M) int {
	root, err := testkit.ModuleRoot()
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	// In a directory every user can traverse: TestPermissionDenied runs
	// `restart` as an unprivileged user, who must be able to reach it.
	b, remove, err := testkit.BuildTemp(root)
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	defer remove()
	bin = b
	return m.Run()
}
