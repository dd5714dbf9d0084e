// Package bpf holds baton's BPF programs and their generated Go bindings.
//
// steer.c is the SO_REUSEPORT selector that keeps UDP and QUIC datagrams
// on the generation that owns their flow while generations overlap. xdp.c
// makes the same decision for AF_XDP listeners, at the XDP hook, and
// redirects each datagram to its generation's AF_XDP socket; the two share
// classify.h, and with it the types and meaning of their config, flows,
// initials and counters maps. tcp.c is the TCP listeners' selector: new
// connections go to the working generation's listening socket (or a
// canary's share to a second one), and connections queued on a listener
// that stops listening migrate to it. The steer package drives them. What
// all three share (limits, counter kinds, the counters map, and the
// socket array of the two sk_reuseport programs) is defined once, in
// steer.h. The compiled objects (little- and big-endian) are committed, so
// building baton needs no clang; `go generate ./internal/bpf/` rebuilds
// them and must reproduce the committed files byte for byte.
//
// The enums of steer.h reach Go through the objects' BTF: bpf2go emits them
// here (-type), and internal/contract generates its limits from the same
// BTF.
//
// The XDP object's bindings have no types of their own (-no-global-types):
// its maps' keys and values are the same C structs as the UDP object's, so
// user space reads and writes both with the Steer types (SteerConfig,
// SteerFlowKey, ...), and TestXDPSpec checks that the two objects' BTF
// agree on them.
//
// include/asm holds one-line shims that point the kernel UAPI headers at
// their architecture-independent versions, so the objects do not depend on
// the build host's multiarch include directory.
package bpf

//go:generate go run github.com/cilium/ebpf/cmd/bpf2go -cc clang -cflags "-O2 -mcpu=v3 -Wall -Werror -I./include" -type steer_limits -type steer_modes -type steer_counters Steer steer.c
//go:generate go run github.com/cilium/ebpf/cmd/bpf2go -cc clang -cflags "-O2 -mcpu=v3 -Wall -Werror -I./include" TCP tcp.c
//go:generate go run github.com/cilium/ebpf/cmd/bpf2go -cc clang -cflags "-O2 -mcpu=v3 -Wall -Werror -I./include" -no-global-types XDP xdp.c
