//go:build ignore

/* xdp_steer: the XDP program of an AF_XDP listener (one UDP port on one
 * interface). Every generation owns a slot (1..31), as with the
 * sk_reuseport program (steer.c), and one AF_XDP socket per receive queue
 * it serves, in the XSKMAP xsks at slot * STEER_MAX_QUEUES + queue. This
 * program picks, per datagram to the listener's port, the generation that
 * knows the flow, or for new flows the working generation (or, for its
 * share of them, a canary), exactly as steer.c does: the decision is
 * classify.h's, with the same load-time constants and maps (config,
 * flows, tuples, initials, counters) of the same types, so user space drives both
 * programs with one code path.
 *
 * What is not the listener's passes to the kernel's stack untouched
 * (XDP_PASS): other Ethernet types (ARP, VLAN-tagged frames, ...), other
 * IP protocols (ICMP, ICMPv6 and so neighbour discovery, TCP), other UDP
 * ports, IPv4 fragments (only the first holds the UDP header; the stack
 * reassembles them), IPv6 with extension headers (UDP must be the fixed
 * header's next header), and frames too short for the headers up to and
 * including the UDP header and the part of the datagram the program reads.
 * The program checks only what it reads: a datagram's length past that,
 * its checksum and its IP total length are for the socket's reader to
 * check, as for any frame in its ring. The listener is the port on every
 * address of the interface: the destination address is not compared.
 * With steer_mode off, every datagram of the listener goes to the working
 * slot (counted as FALLBACK).
 *
 * A datagram for the listener goes to the chosen slot's socket on the
 * queue it arrived on (a redirect to an XSKMAP only works to a socket bound
 * to the packet's own queue); if that slot has none there, to the working
 * slot's; else it is dropped, counted as steer.c counts: ERROR for each
 * slot that had no socket, DROP on slot 0.
 *
 * Cost: the common frames (IPv4 without options, IPv6 without extension
 * headers) are read at constant offsets, with no helper call (IPv4 with
 * options takes two bpf_xdp_load_bytes calls); the keyed hash of the
 * 4-tuple (xdp_hash) is a dozen or two ALU instructions where steer.c
 * reads the kernel's. A lookup in an XSKMAP is inlined by the verifier;
 * the redirect is one helper call. */

#include "classify.h"

/* Frame layout: untagged Ethernet, then IPv4 or IPv6, then UDP. */
#define ETH_HLEN 14
#define ETH_PROTO 12
#define IP4_HLEN 20
#define IP4_FRAG (ETH_HLEN + 6)     /* flags and fragment offset */
#define IP4_PROTO (ETH_HLEN + 9)
#define IP4_SADDR (ETH_HLEN + 12)
#define IP4_DADDR (ETH_HLEN + 16)
#define IP4_UDP (ETH_HLEN + IP4_HLEN) /* without options */
#define IP4_MF_OFFSET 0x3fff          /* more fragments, fragment offset */
#define IP6_HLEN 40
#define IP6_NEXT (ETH_HLEN + 6)
#define IP6_SADDR (ETH_HLEN + 8)
#define IP6_UDP (ETH_HLEN + IP6_HLEN)
#define PROTO_UDP 17
#define UDP_DPORT 2
#define UDP_LEN 4

/* The listener's UDP port, in network order (as it is on the wire), and
 * the key of xdp_hash: both set by user space at load time. */
volatile const __u16 xdp_port = 0;
volatile const __u32 xdp_hash_seed = 0;

/* The generations' AF_XDP sockets: slot * STEER_MAX_QUEUES + queue. */
struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, STEER_SLOTS * STEER_MAX_QUEUES);
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

/* What the parser found, for classify.h's hooks. */
struct steer_pkt {
	struct xdp_md *ctx;
	__u32 hash;  /* xdp_hash of the 4-tuple */
	__u16 sport; /* network order */
	__u16 v6;    /* IPv6, else IPv4 */
};

static __always_inline __u32 steer_pkt_hash(const struct steer_pkt *p)
{
	return p->hash;
}

static __always_inline int steer_load_sport(struct steer_pkt *p, __u16 *sport)
{
	*sport = p->sport;
	return 0;
}

/* The addresses are at fixed offsets whatever the IPv4 options, and the
 * parser has checked that the frame holds them: read again here, on the
 * handshake paths only, rather than kept for every datagram. Written in
 * 64-bit words (see struct addrs). */
static __always_inline int steer_load_addrs(struct steer_pkt *p, struct addrs *a)
{
	__u8 *data = (void *)(long)p->ctx->data;
	__u8 *end = (void *)(long)p->ctx->data_end;
	__u64 *w = (__u64 *)a;

	if (!p->v6) {
		if (data + IP4_UDP > end)
			return -1;
		/* ::ffff:a.b.c.d: the words 0xffff and the address, in
		 * memory order. */
		__u64 ffff = bpf_htonl(0xffff);
		__u64 sa = *(__u32 *)(data + IP4_SADDR);
		__u64 da = *(__u32 *)(data + IP4_DADDR);

#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
		w[1] = sa << 32 | ffff;
		w[3] = da << 32 | ffff;
#else
		w[1] = ffff << 32 | sa;
		w[3] = ffff << 32 | da;
#endif
		w[0] = 0;
		w[2] = 0;
		return 0;
	}
	if (data + IP6_UDP > end)
		return -1;
#pragma unroll
	for (int i = 0; i < 4; i++)
		w[i] = ((__u64 *)(data + IP6_SADDR))[i];
	return 0;
}

/* xdp_hash: the 4-tuple's keyed hash, where steer.c has the kernel's
 * (ctx->hash). The state starts at the seed and takes the 32-bit words of
 * the source and destination addresses and of the two ports in turn, each
 * by h = m(h ^ w), where m multiplies by an odd constant and xors the high
 * half into the low one; murmur3's 64-bit finalizer ends it.
 *
 * Good enough for what it decides, both of which classify.h's comments on
 * struct flow_key and new_slot describe:
 *
 *   - Keys (flows, initials, with the source port): each step is a
 *     bijection of the state for a given word, and different words give
 *     different states from the same one, so two 4-tuples of a family
 *     have different 64-bit states after the last word, for any seed:
 *     only the final cut to 32 bits can make them share a key, about as
 *     often as for any 32-bit hash, and which ones do depends on the
 *     seed, which nobody outside the host knows. A shared key has the
 *     bounded effects described at struct flow_key.
 *   - The canary's share, from the top of the 32 bits: the finalizer's
 *     avalanche makes them uniform over 4-tuples that differ in a port or
 *     an address bit alone, as clients' do, so the share is the configured
 *     one. A client can pick 4-tuples that land in the canary or not, as
 *     it can by trying source ports against any hash: the share is a
 *     sampling of traffic, not a control.
 *
 * It is not a cryptographic hash, nor does it need to be: nothing it
 * decides grants anything (the kernel's own jhash is no stronger). */
static __always_inline __u64 xdp_mix(__u64 h, __u32 w)
{
	h = (h ^ w) * 0x9e3779b97f4a7c15ULL;
	return h ^ (h >> 32);
}

static __always_inline __u32 xdp_final(__u64 h)
{
	h ^= h >> 33;
	h *= 0xff51afd7ed558ccdULL;
	h ^= h >> 33;
	h *= 0xc4ceb9fe1a85ec53ULL;
	h ^= h >> 33;
	return (__u32)h;
}

/* Hides from clang that var is a packet pointer plus a constant, so that
 * it does not merge two inlined copies of one function, at different
 * constant offsets, into one that adds the offset from a register: the
 * verifier refuses packet pointer plus register without CAP_PERFMON. No
 * instruction; the verifier still knows the pointer's offset. */
#define opaque(var) asm volatile("" : "+r"(var))

/* Copies the datagram's head, UDP header first, into hw as classify.h's
 * parser reads it (see load_head in steer.c, which this follows), for a
 * UDP header at udp, a packet pointer at the constant frame offset off:
 * all STEER_HDR_BYTES when the frame holds them, else whole words and
 * zero after them. What it copies past the datagram's end (Ethernet pads
 * frames to 60 bytes) is copied again with the helper, which takes an
 * exact length, so that the copy is zero past the end as the parser
 * expects. Returns 0 if what the parser reads is there; -1 if the frame
 * does not hold that much of the datagram it claims to carry. */
static __always_inline int xdp_load_head(struct xdp_md *ctx, __u8 *udp, __u8 *end, __u32 off,
					 __u64 *hw, __u32 len)
{
	__u8 *h = (__u8 *)hw;
	__u32 n = UDP_HDR, need;

	opaque(udp);
	if (len >= STEER_HDR_BYTES && udp + STEER_HDR_BYTES <= end) {
#pragma unroll
		for (int i = 0; i < STEER_HDR_BYTES / 8; i++)
			hw[i] = ((__u64 *)udp)[i];
		return 0;
	}
#pragma unroll
	for (int i = 0; i < STEER_HDR_BYTES / 8; i++)
		hw[i] = 0;
	/* The parser has checked the UDP header is there. */
	hw[0] = *(__u64 *)udp;
#pragma unroll
	for (int i = 1; i < STEER_HDR_BYTES / 8 - 1; i++) {
		if (udp + 8 * i + 8 > end)
			break;
		hw[i] = ((__u64 *)udp)[i];
		n = 8 * i + 8;
	}
	need = len < STEER_HDR_BYTES ? len : STEER_HDR_BYTES;
	if (quic_head_need(h[UDP_HDR]) < need && n > UDP_HDR)
		need = quic_head_need(h[UDP_HDR]);
	if (n >= need && n <= len)
		return 0;
	if (n > len) {
		/* Tiny datagram in a padded frame: n <= 32, so len < 32. */
#pragma unroll
		for (int i = 1; i < STEER_HDR_BYTES / 8; i++)
			hw[i] = 0;
		return bpf_xdp_load_bytes(ctx, off, h, len < STEER_HDR_BYTES ? len : STEER_HDR_BYTES)
			       ? -1 : 0;
	}
	return bpf_xdp_load_bytes(ctx, off, h, need) ? -1 : 0;
}

/* The slot's socket on queue q, if it has one there: redirects to it. */
static __always_inline int xdp_take(__u32 slot, __u32 q)
{
	__u32 key = (slot & (STEER_SLOTS - 1)) * STEER_MAX_QUEUES + q;

	if (q >= STEER_MAX_QUEUES || !bpf_map_lookup_elem(&xsks, &key))
		return 0;
	/* A socket removed since the lookup fails the redirect, which
	 * returns the flags' action then: 0, XDP_ABORTED. */
	return bpf_redirect_map(&xsks, key, 0) == XDP_REDIRECT;
}

SEC("xdp")
int xdp_steer(struct xdp_md *ctx)
{
	__u8 *data = (void *)(long)ctx->data;
	__u8 *end = (void *)(long)ctx->data_end;
	struct steer_pkt p = { .ctx = ctx };
	__u64 hw[STEER_HDR_BYTES / 8];
	__u64 hash = xdp_hash_seed;
	__u32 len;

	if (data + ETH_HLEN > end)
		return XDP_PASS;
	__u16 proto = *(__u16 *)(data + ETH_PROTO);

	if (proto == bpf_htons(ETH_P_IP)) {
		if (data + IP4_UDP > end)
			return XDP_PASS;
		__u8 vihl = data[ETH_HLEN];

		if (data[IP4_PROTO] != PROTO_UDP ||
		    (*(__u16 *)(data + IP4_FRAG) & bpf_htons(IP4_MF_OFFSET)))
			return XDP_PASS;
		hash = xdp_mix(hash, *(__u32 *)(data + IP4_SADDR));
		hash = xdp_mix(hash, *(__u32 *)(data + IP4_DADDR));
		if (vihl == 0x45) {
			__u8 *udp = data + IP4_UDP;

			if (udp + UDP_HDR > end || *(__u16 *)(udp + UDP_DPORT) != xdp_port)
				return XDP_PASS;
			len = bpf_ntohs(*(__u16 *)(udp + UDP_LEN));
			if (len < UDP_HDR)
				return XDP_PASS;
			hash = xdp_mix(hash, *(__u32 *)udp);
			p.sport = *(__u16 *)udp;
			if (steer_mode == STEER_MODE_QUIC &&
			    xdp_load_head(ctx, udp, end, IP4_UDP, hw, len))
				return XDP_PASS;
		} else {
			/* Options: the UDP header is at an offset the
			 * verifier does not know, which only a helper reads
			 * without CAP_PERFMON. Rare enough for two calls. */
			__u32 ihl = vihl & 0xf;

			if ((vihl >> 4) != 4 || ihl < 5)
				return XDP_PASS;
			__u32 off = ETH_HLEN + ihl * 4;

#pragma unroll
			for (int i = 0; i < STEER_HDR_BYTES / 8; i++)
				hw[i] = 0;
			if (bpf_xdp_load_bytes(ctx, off, hw, UDP_HDR))
				return XDP_PASS;
			__u8 *h = (__u8 *)hw;

			if (*(__u16 *)(h + UDP_DPORT) != xdp_port)
				return XDP_PASS;
			len = bpf_ntohs(*(__u16 *)(h + UDP_LEN));
			if (len < UDP_HDR)
				return XDP_PASS;
			hash = xdp_mix(hash, *(__u32 *)h);
			p.sport = *(__u16 *)h;
			if (steer_mode == STEER_MODE_QUIC && len > UDP_HDR &&
			    bpf_xdp_load_bytes(ctx, off, h, len < STEER_HDR_BYTES ? len : STEER_HDR_BYTES))
				return XDP_PASS;
		}
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		__u8 *udp = data + IP6_UDP;

		if (udp + UDP_HDR > end || (data[ETH_HLEN] >> 4) != 6 || data[IP6_NEXT] != PROTO_UDP ||
		    *(__u16 *)(udp + UDP_DPORT) != xdp_port)
			return XDP_PASS;
		len = bpf_ntohs(*(__u16 *)(udp + UDP_LEN));
		if (len < UDP_HDR)
			return XDP_PASS;
#pragma unroll
		for (int i = 0; i < 8; i++)
			hash = xdp_mix(hash, ((__u32 *)(data + IP6_SADDR))[i]);
		hash = xdp_mix(hash, *(__u32 *)udp);
		p.sport = *(__u16 *)udp;
		p.v6 = 1;
		if (steer_mode == STEER_MODE_QUIC && xdp_load_head(ctx, udp, end, IP6_UDP, hw, len))
			return XDP_PASS;
	} else {
		return XDP_PASS;
	}
	p.hash = xdp_final(hash);

	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&config, &zero);

	if (!cfg)
		return XDP_DROP;
	__u32 working = cfg->working & (STEER_SLOTS - 1);
	/* Computed for every datagram, as in steer.c (see new_slot in classify.h). */
	__u32 to = new_slot(&p, cfg, working);
	struct choice c = {
		.slot = working,
		.kind = STEER_CNT_FALLBACK,
	};

	/* Mode off: no classification, every datagram to the working slot. */
	if (steer_mode == STEER_MODE_QUIC)
		steer_quic(&p, cfg, (__u8 *)hw, len, to, &c);
	else if (steer_mode == STEER_MODE_FLOW)
		steer_flow(&p, cfg, to, &c);

	__u32 q = ctx->rx_queue_index;

	if (xdp_take(c.slot, q)) {
		count(c.slot, c.kind);
		return XDP_REDIRECT;
	}
	count(c.slot, STEER_CNT_ERROR);
	if (c.slot != working) {
		if (xdp_take(working, q)) {
			count(working, STEER_CNT_FALLBACK);
			return XDP_REDIRECT;
		}
		count(working, STEER_CNT_ERROR);
	}
	count(0, STEER_CNT_DROP);
	return XDP_DROP;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
