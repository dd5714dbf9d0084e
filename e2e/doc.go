// Package e2e holds baton's end-to-end tests: they build the real binaries
// (baton, restart, examples/httpd, examples/sdhttpd), run them as root in a
// private network namespace per test, drive real HTTP load through restarts
// and faults, and judge the outcome from exit codes, status JSON, /proc and
// the load generator's counts.
//
// Run with: go test -count=1 -timeout 20m ./e2e/
package e2e
