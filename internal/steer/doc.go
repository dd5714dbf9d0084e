// Package steer is the user-space side of baton's per-generation steering:
// UDP and QUIC datagrams (Group, below) and TCP connections (TCPGroup, see
// "TCP" at the end).
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
// the next AddGeneration, except new flows and handshakes while there is a
// canary (below): the canary then takes them all.
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
// # Canary
//
// SetCanary(slot, permille) gives a second live generation permille
// thousandths of new flows (ModeFlow) or new QUIC handshakes (ModeQUIC);
// the working generation gets the rest. The share is chosen by the
// kernel's hash of the client's 4-tuple, as for TCP, so it is stable per
// 4-tuple: within about a percentage point of permille/10 % over five
// thousand clients. In ModeQUIC a new handshake is an Initial or 0-RTT
// packet that no pin or 4-tuple record of an earlier Initial sends
// elsewhere; a client's Initial after a Retry still reaches the
// generation that sent the Retry. Nothing already placed moves when the
// canary is set, changed or ended: flows keep their entry, handshakes
// their pins, connections their CIDs. Datagrams that nothing routes (junk,
// CIDs of no live slot) go to the working generation, never the canary.
// slot 0 or permille 0 ends the canary; SetWorking(canary) promotes it
// and ends it; Release(canary) ends it, and its flows go to the working
// generation like any released generation's. The canary is part of the
// program's config, so it survives a handover (UpgradeState carries it
// too). A program adopted from a baton that predates the canary, and
// ModeOff, have none: SetCanary fails with ErrCanaryUnsupported.
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
// Counters gives per-slot counts of the program's decisions (a canary's
// new flows count in its New). A draining generation's counters move only
// while clients still send to it (by CID or by pin), so LastActivity and
// Idle, polled by the supervisor, tell when it has gone quiet. The
// program keeps no timestamp per slot: the precision is the polling
// interval.
//
// Flows counts, per live slot, the flow table entries the program would
// still honour, for status: in ModeFlow the flows that stay with the
// generation (not idle past FlowIdle), in ModeQUIC the client 4-tuples
// whose latest new handshake the generation took within InitialPin. It
// reads the whole table (65536 entries by default) in batches, and
// compares the entries' stamps with the program's clock as user space
// reads it (bpf.NowNs).
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
//
// # TCP
//
// A TCPGroup is one TCP listener address. Every generation gets a listening
// socket of its own, bound with SO_REUSEPORT to the address, at its slot
// (1..31) in the socket array of a second program (bpf/tcp.c) attached to
// the reuseport group. Each generation thus has its own socket and its own
// open file description: what a server does to its listener (shutdown(2)
// at drain, O_NONBLOCK, close) affects its generation only.
//
//	g, err := steer.NewTCPGroup("[::]:443", steer.TCPConfig{}, first) // first: systemd's socket, or nil
//	slot, f, err := g.AddGeneration() // pass f to the child; the group owns it
//	...                               // child ready
//	err = g.SetWorking(slot)          // the flip
//	err = g.Release(old)              // old's waiting connections move to slot
//
// The program runs for every SYN (and every ACK that completes a SYN-cookie
// handshake) and sends it to the working slot's socket, never to another
// generation's, so an old generation gets no new connection after the flip
// whether or not it was told to stop accepting. With a canary
// (SetCanary(slot, permille)), the canary's share of new connections goes
// to its slot instead, chosen by the kernel's hash of the 4-tuple (within
// about a percentage point over ten thousand clients). SetWorking(canary)
// promotes it.
//
// The program is attached as BPF_SK_REUSEPORT_SELECT_OR_MIGRATE. When a
// socket stops listening (Release shuts it down; so does a server's own
// shutdown(SHUT_RD or SHUT_RDWR); or its last descriptor is closed), the
// kernel runs it for each connection waiting in that socket's accept queue
// at once, and for each of its half-open ones when their handshake
// completes, and moves them to the socket it selects instead of resetting
// them: the working slot, else the canary, else the parked first socket
// (below). When no socket can be selected (no slot is working, or the
// working generation shut its own socket down), the program lets the
// kernel hash the connection among whatever sockets still listen; it is
// reset only if none does. A listener that queues it is better than a
// reset, and if that one stops listening too, its queue moves again.
//
// Release(slot) is for a generation that is gone or going: the slot gets
// no new connection, its socket is shut down for reading (whoever else
// holds it: the generation if it still runs, systemd for the first
// socket), its queue moves as above, a generation still blocked in
// accept(2) on it gets EINVAL, the group's copy is closed and the slot is
// free. Unlike a UDP slot it may be given to a new generation at once:
// the old socket no longer listens and has left the array. Release the
// crashed working generation only after its replacement is working, so
// that connections that queued in its socket meanwhile move to the
// replacement.
//
// Listening(slot) is false once a slot's socket no longer listens or has
// left the program's array (a server that shut it down, perhaps to listen
// again: a socket that listens again stays out of the array). While the
// generation runs and is meant to serve, that is a broken generation;
// NotListening lists them for status. TCPCounters counts, per slot, new
// connections, migrations, and choices of a socket that could not be
// selected; slot 0 counts the parked first socket's and those left to the
// kernel's hash.
//
// # TCP: the first socket
//
// A listener's first socket is the one systemd holds: activated by a
// .socket unit, or opened by baton and kept in systemd's fd store, in
// which connections wait while baton starts, and across a restart of
// baton. NewTCPGroup takes it (or opens one itself when given nil), sets
// SO_REUSEPORT if systemd did not (ReusePort=no), makes it listen if it
// does not, and parks it: at index 0 of the array, where the program
// sends connections while no slot is working. The next AddGeneration gets
// the parked first socket itself, with every connection waiting in it, so
// the first generation serves what queued before baton started.
//
// When the generation that holds the first socket is released while
// another one works, the first socket is shut down like any other: its
// queue moves to the working generation, and systemd's copy no longer
// listens. When instead the release leaves no generation working (the
// first generation failed, or baton is stopping), the first socket is
// parked again: the generation's own first socket keeps listening with its
// queue, or a first socket released earlier listens again before the last
// generation's socket is shut down, so that its queue moves to the first
// socket. Close parks it too unless a generation still holds it.
// Connections then wait in systemd's socket for the next generation or the
// next baton, as they did when all generations shared that one socket.
//
// A baton that systemd starts again gets the first socket back, listening
// or not. A socket that stopped listening has kept its address (it was
// bound to an explicit port) and its place in the reuseport group; it
// listens again and rejoins it. A socket that kept listening (parked at a
// stop, or serving a generation when the supervisor died) is still in the
// dead program's socket array, which holds a socket at most once:
// attaching the new program frees the old one, and the insert succeeds
// once the kernel has freed its array (tens of milliseconds here).
// Meanwhile the new program has no working slot and leaves connections to
// the kernel's hash, which finds the first socket.
//
// What baton cannot keep: if baton dies after the first socket was shut
// down, its generations die with it and nothing listens until systemd
// starts baton again; connections that waited in their sockets are reset.
//
// # TCP: requirements
//
// Linux 5.14 or later (migration) and CAP_BPF plus CAP_NET_ADMIN, or root;
// otherwise NewTCPGroup's error wraps ErrTCPSteeringUnavailable, and a
// supervisor can keep one listening socket shared by all generations.
// The kernel groups only sockets of one owner uid, so a first socket of
// another user is refused the same way. systemd sets SO_REUSEADDR on its
// sockets, and the group's sockets have it too; a first socket that had
// neither SO_REUSEADDR nor SO_REUSEPORT keeps every other socket off its
// address (EADDRINUSE) for as long as a connection it took before
// SO_REUSEPORT was set lives, TIME_WAIT included.
//
// # TCP: upgrade
//
// As for UDP (Files, Freeze, Thaw, Adopt): Files passes the program, its
// maps, the first socket and every generation's socket; Freeze stops the
// old group's writes to the maps. The old group still shuts down the
// sockets of the generations it releases afterwards, which needs no map
// write, so their queues move to the successor's working generation.
// AdoptTCP builds the successor's group, which sees whether the old
// sockets listen and releases their slots when the old generations are
// gone. Thaw(false) after a failed handover takes the maps back.
package steer
