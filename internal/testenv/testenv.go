// Package testenv holds the project's one rule for tests that need
// something a developer's machine may lack (root, a tool): skip with a
// clear message on a laptop, but fail under CI=true, where a skip would
// count as a pass and hide a misconfigured runner.
package testenv

import (
	"os"
	"testing"
)

// Unavailable skips the test with msg, or fails it under CI=true.
func Unavailable(t testing.TB, msg string) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatal(msg + "; CI=true, so a skip would count as a pass")
	}
	t.Skip(msg)
}

// RequireRoot calls Unavailable unless the test runs as root; why says
// what root is needed for.
func RequireRoot(t testing.TB, why string) {
	t.Helper()
	if os.Geteuid() != 0 {
		Unavailable(t, "needs root: "+why+" (run with sudo)")
	}
}

// SharedDir is a temporary directory that other users can traverse,
// unlike t.TempDir whose parents are 0700: for tests that run a client
// as another uid.
func SharedDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "baton-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}
