// Package testkit is what baton's end-to-end tests, its benchmark, its demo
// and the unit tests that run a client as another user share to drive real
// processes: a process launcher (inside a network namespace, with extra
// environment, descriptors and credentials, its output kept), /proc
// helpers, a stand-in for systemd's notify socket, the test binary run as a
// helper under another uid, the project's binaries built once (with the
// test server in unmodified/, which knows nothing of baton), and Caddy at
// a pinned release, built once (cmd/installcaddy builds it ahead), with a
// Caddyfile for baton's sockets.
//
// It imports nothing of baton's own but internal/netns and
// internal/testenv, so that the in-package tests of any package,
// internal/control's included, can use it. What needs baton's control protocol (a `baton run` and its status,
// the restart command's output) is in internal/testkit/batontest.
package testkit
