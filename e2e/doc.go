// Package e2e holds baton's end-to-end tests: they build the real binaries
// (baton, restart, examples/httpd, examples/sdhttpd, the unmodified test
// server), run them and servers that know nothing of baton (Caddy, built
// at a pinned version by internal/testkit; a Python server in testdata)
// as root in a private network namespace per test, drive real HTTP load through restarts
// and faults, and judge the outcome from exit codes, status JSON, /proc and
// the load generator's counts.
//
// Run with: go test -count=1 -timeout 20m ./e2e/
package e2e
