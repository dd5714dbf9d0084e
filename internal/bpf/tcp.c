//go:build ignore

/* steer_tcp: the SO_REUSEPORT socket selector baton attaches to each TCP
 * listener's reuseport group. Every generation has a listening socket of
 * its own, stored in the socket array at its slot (1..31). Index 0 holds
 * the listener's *first* socket (systemd's, or the one baton keeps in
 * systemd's fd store) while it is parked: listening, but served by no
 * generation, so that connections wait in it for the next one.
 *
 * The kernel runs the program in two cases:
 *
 *   - Selection: a packet that no connection or request socket takes is
 *     matched against the listeners (a SYN, or the ACK that completes a
 *     SYN-cookie handshake). It goes to the working slot, or, for the
 *     canary's share of 4-tuples, to the canary slot. Never to another
 *     generation: an old generation gets no new connection after the flip,
 *     whether or not it was told to stop accepting.
 *   - Migration: a listener stopped listening (the last reference was
 *     closed, or someone called shutdown(SHUT_RD) on it) while connections
 *     waited in its accept queue, or, later, when the last ACK or the
 *     SYN-ACK timer of a request it had started fires. ctx->migrating_sk is
 *     that connection, which moves to the socket selected. The kernel only
 *     does this for a program attached as BPF_SK_REUSEPORT_SELECT_OR_MIGRATE
 *     (this section); otherwise, unless net.ipv4.tcp_migrate_req is set,
 *     it resets them. By then the closed listener has left the socket
 *     array, so its own slot cannot be selected.
 *
 * Order of choice, first socket that can be selected:
 *
 *   new connection: canary (its share) or working, then the other one, then
 *                   the parked first socket;
 *   migration:      working, canary, parked first socket;
 *
 * else SK_PASS without a selection, which lets the kernel hash the
 * connection among the group's listeners (a reset only if none listens).
 * That only happens when no slot is set or none can be selected: while the
 * first socket moves between index 0 and a slot (it is then the only
 * listener), when the working generation shut its own socket down, or
 * after the supervisor died and its generations' sockets closed (the
 * first socket, which systemd keeps, may still listen). A listener that
 * queues the connection is better than a reset: whoever serves from it
 * takes it, and if it stops listening first, its queue migrates again.
 * SK_DROP would reset the connection, and is left for a missing config.
 *
 * Cost: one inlined config lookup, one bpf_sk_select_reuseport call and one
 * counter increment per new connection; the canary adds a multiplication.
 *
 * User space (internal/steer's TCPGroup) owns all policy: it inserts the
 * sockets and writes the config map. Limits, the socket array and the
 * counters are steer.h's, shared with the UDP program (steer.c). */

/* One socket per slot, at index slot; index 0 is the parked first socket. */
#define STEER_SOCKET_ENTRIES STEER_SLOTS
#include "steer.h"

/* Written whole by user space. */
struct config {
	__u32 working; /* slot for new connections; 0 = none */
	/* A second slot that takes canary_permille thousandths of new
	 * connections, chosen by the kernel's 4-tuple hash so that a SYN-cookie
	 * ACK finds the slot its SYN chose; 0 = none. */
	__u32 canary;
	__u32 canary_permille; /* 0..STEER_PERMILLE */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} config SEC(".maps");

/* Selects the socket at index slot and counts kind for the slot. */
static __always_inline int take(struct sk_reuseport_md *ctx, __u32 slot, __u32 kind)
{
	__u32 idx = slot;

	if (bpf_sk_select_reuseport(ctx, &sockets, &idx, 0))
		return 0;
	count(slot, kind);
	return 1;
}

SEC("sk_reuseport/migrate")
int steer_tcp(struct sk_reuseport_md *ctx)
{
	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&config, &zero);

	if (!cfg)
		return SK_DROP;
	__u32 working = cfg->working & (STEER_SLOTS - 1);
	__u32 canary = cfg->canary & (STEER_SLOTS - 1);
	__u32 kind = STEER_CNT_NEW;
	__u32 first = working, second = canary;

	if (ctx->migrating_sk) {
		kind = STEER_CNT_MIGRATE;
	} else if (canary && (((__u64)ctx->hash * STEER_PERMILLE) >> 32) < cfg->canary_permille) {
		/* ctx->hash is the kernel's keyed hash of the 4-tuple, uniform
		 * over 32 bits: its top part scaled to 0..999. */
		first = canary;
		second = working;
	}
	if (first) {
		if (take(ctx, first, kind))
			return SK_PASS;
		count(first, STEER_CNT_ERROR);
	}
	if (second && second != first) {
		if (take(ctx, second, kind))
			return SK_PASS;
		count(second, STEER_CNT_ERROR);
	}
	if (take(ctx, 0, kind))
		return SK_PASS;
	count(0, STEER_CNT_HASHED);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
