/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akz_resolver.h - the upstream host's addresses, looked up off the bridge thread and kept. */
#ifndef AKZ_RESOLVER_H
#define AKZ_RESOLVER_H

#include <stddef.h>
#include <stdint.h>

#define AKZ_ADDR_MAX 46          /* INET6_ADDRSTRLEN: the longest numeric address, with its NUL */

struct akz_resolver;

enum akz_resolve {
	AKZ_RESOLVE_OK,              /* an address is known */
	AKZ_RESOLVE_PENDING,         /* the first lookup is under way */
	AKZ_RESOLVE_FAILED,          /* no address known: the last lookup failed */
};

/* Starts finding host's addresses: a thread of its own runs getaddrinfo(), the first lookup at
 * once, the next ones every refresh_s seconds (5 s after a failed one), and when a connection to
 * an address failed. A numeric host needs no lookup and no thread. Returns 0, or -1 with the
 * reason in err. */
int akz_resolver_new(const char *host, int refresh_s, struct akz_resolver **out,
		char *err, size_t errlen);

/* What a connect would get now, without taking an address. Never blocks. */
enum akz_resolve akz_resolver_state(struct akz_resolver *r);

/* Copies the address to connect to next into addr (numeric, AKZ_ADDR_MAX bytes), taking the
 * known addresses in turn and skipping those a connection recently failed to (unless all
 * did). Addresses are kept when a later lookup fails: the name server may be down while the
 * upstream is not. Returns AKZ_RESOLVE_OK, or PENDING / FAILED with nothing copied (FAILED:
 * the lookup's error in err). Never blocks. */
enum akz_resolve akz_resolver_pick(struct akz_resolver *r, char *addr, char *err, size_t errlen);

/* Tells that a connection to addr failed before the MQTT handshake: the address is skipped for
 * a while and the name looked up again (at most every few seconds). Never blocks. */
void akz_resolver_failed(struct akz_resolver *r, const char *addr);

/* Stops the lookup thread (waiting for a lookup under way to end) and frees r. NULL is
 * ignored. */
void akz_resolver_free(struct akz_resolver *r);

#endif
