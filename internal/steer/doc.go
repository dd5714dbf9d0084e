// Package steer is the user-space side of baton's per-generation UDP and
// QUIC steering.
//
// UDP has no listening socket that an old generation can simply stop
// accepting on. Instead every generation gets its own sockets, bound with
// SO_REUSEPORT to the listener's address, and a BPF program (bpf/steer.c)
// attached to the reuseport group picks, for every datagram, the
// generation that owns its flow or connection; new flows and new QUIC
// handshakes go to the *working* generation. The program never lets the
// kernel's own hash choose (which would hand new flows to draining
// generations): when it cannot select a socket it falls back to the
// working generation, and failing that drops the datagram.
//
// # Model
//
// A Group is one UDP listener address. It holds an *anchor* socket, bound
// first, which carries the program and is never selected or read, and up
// to 31 generations, each in a *slot* (1..31) with Workers sockets. A slot
// is not given to another generation until Release says its generation is
// gone.
//
//	g, err := steer.NewGroup("[::]:443", steer.Config{Mode: contract.ModeQUIC})
//	slot, files, err := g.AddGeneration() // pass files to the child; env from g.Env(slot)
//	...                                   // child ready
//	err = g.SetWorking(slot)              // the flip
//	...                                   // old generation drains; poll g.Idle(old, quiet)
//	err = g.Release(old)                  // old generation's processes are gone
//
// The first generation of a group becomes the working one when it is
// added, so datagrams queue in its sockets while it starts. Release of the
// working slot leaves none: datagrams are then dropped (and counted) until
// the next AddGeneration.
//
// A generation serving several UDP listeners must have the same slot in
// each, since its CIDs carry one slot number: allocate it with
// AddGeneration on one group and AddGenerationAt on the others.
//
// # Modes
//
// The modes are contract.Mode values.
//
//   - ModeQUIC: datagrams whose DCID was chosen by a server (short
//     headers, Handshake packets) go to the slot the DCID names, whatever
//     the client's address, so connections survive NAT rebinding and
//     migration across a restart. A client's first Initial goes to the
//     working slot and pins its 4-tuple and DCID there for
//     Config.InitialPin, so retransmissions and 0-RTT packets follow it
//     across a flip. An Initial or 0-RTT packet that carries a live older
//     slot's CID (the client's Initial after that generation's Retry)
//     goes to that slot only if the same 4-tuple's handshake was taken by
//     it within InitialPin; a random client DCID that merely looks like a
//     server CID goes to the working slot. Datagrams that are not QUIC
//     v1/v2 (version negotiation, unknown versions, junk, truncated
//     headers) and CIDs that name no live slot go to the working slot.
//   - ModeFlow: each 4-tuple stays with the generation that got its first
//     datagram until it has been idle for Config.FlowIdle. For UDP
//     protocols other than QUIC.
//   - ModeOff: no program; every generation receives a duplicate of the
//     anchor socket and the kernel delivers each datagram to whichever
//     generation reads first. Needs no privileges.
//
// With Workers > 1, a generation gets one socket per worker; worker i
// reads files[i]. The worker is taken from the CID's worker octet when the
// layout has one and the CID routed the datagram, otherwise from the
// kernel's 4-tuple hash, so one flow stays on one worker.
//
// # CID layout
//
// In ModeQUIC every server-chosen connection ID has a fixed length L
// (contract.CIDLayout.Len, default 8; short headers carry no length). Octet
// CIDLayout.SlotOffset (default 0) holds the generation's slot in its low
// 5 bits; its top 3 bits are the server's to use as a QUIC-LB
// config-rotation codepoint, except that 0b111 ("unroutable") makes the
// program ignore the slot. Optionally octet CIDLayout.WorkerOffset holds a
// value whose remainder modulo the number of workers is the worker index.
// All other bytes should be random. CIDLayout.Stamp is the reference
// encoder. Client-chosen DCIDs are never read as slots except as
// described above.
//
// # Environment of a generation
//
// Env (contract.UDPEnv) returns these variables; a child's CID generator reads
// them (the BATON_CID_* ones only exist in ModeQUIC):
//
//	BATON_UDP_STEER          off, flow or quic
//	BATON_UDP_WORKERS        sockets per UDP listener (W); worker i reads the i-th
//	BATON_CID_LEN            L: length of every CID the server issues, 1..20
//	BATON_CID_SLOT_OFFSET    index of the slot octet in the CID
//	BATON_CID_WORKER_OFFSET  index of the worker octet, or -1 for none
//	BATON_CID_SLOT           this generation's slot, 1..31: put it in the low
//	                         5 bits of the slot octet; the top 3 bits may hold a
//	                         QUIC-LB codepoint other than 0b111
//
// A worker i writes a value congruent to i modulo W in the worker octet.
// A server that issues other CIDs (wrong length, other slot) still works,
// but its connections lose their generation at the next restart and NAT
// rebinding reaches the working generation instead.
//
// # Drain
//
// Counters gives per-slot counts of the program's decisions. A draining
// generation's counters move only while clients still send to it (by CID
// or by pin), so LastActivity and Idle, polled by the supervisor, tell when
// it has gone quiet. The program keeps no timestamp per slot: the
// precision is the polling interval.
//
// # Requirements
//
// ModeFlow and ModeQUIC need Linux 5.11 or later and CAP_BPF plus
// CAP_NET_ADMIN (or root). Without them NewGroup fails with an error that
// wraps ErrSteeringUnavailable and names the fix: run as root, grant
// CAP_BPF and CAP_NET_ADMIN, or use ?steer=off. The program is small
// enough for the verifier without CAP_PERFMON. All sockets of a group are
// created by the group (or, for the anchor, inherited from systemd and
// given SO_REUSEPORT if it lacks it) so they share an owner, which the
// kernel requires of a reuseport group. Close does not detach the program: generations still
// running keep being steered by the last configuration.
package steer
