// Package contract is the interface between the baton supervisor and the
// generations it runs, in one place for both sides: the environment
// variables, the file descriptor layout, the readiness and notify
// vocabulary, the UDP steering modes and the layout of the QUIC
// connection IDs that steering reads.
//
// The supervisor builds a generation's environment from these names and
// parses its messages with this vocabulary; package handoff, the
// server-side library, reads the same environment and sends the same
// messages. The steering program's limits (limits_gen.go) are generated
// from the BTF of the compiled program, internal/bpf/steer_bpfel.o, so they
// cannot drift from steer.c.
//
// The package imports only the standard library: the supervisor, the
// command-line tools and the server library all use it without linking
// one another's dependencies.
package contract

//go:generate go run ./internal/genlimits -obj ../bpf/steer_bpfel.o -out limits_gen.go
