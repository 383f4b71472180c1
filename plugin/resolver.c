/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* resolver.c - the upstream host's addresses, looked up off the bridge thread and kept. */
#include <errno.h>
#include <netdb.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include "akz_resolver.h"
#include "akz_util.h"

/* Why: libmosquitto resolves the host inside its connect call, with the blocking getaddrinfo(),
 * on the thread that drives every device. Each connect then waited for a name server round trip
 * (a lookup per device: 10,000 queries for a fleet coming back), and a slow or unreachable name
 * server stalled every connected device's traffic and keepalives for seconds at a time. Here
 * one thread does the lookups, the bridge connects to numeric addresses, and the server name
 * still goes into SNI and the certificate check (tls.c). */
#define MAX_ADDRS 16
#define RETRY_MS 5000            /* lookups after a failure: at most this often */
#define AVOID_MS 30000           /* an address a connection failed to is skipped this long */

struct akz_resolver {
	char *host;
	bool numeric;                /* host is an address: nothing to look up, no thread */
	struct akz_thread thread;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	/* under lock: */
	bool wanted, busy, stop;
	char addrs[MAX_ADDRS][AKZ_ADDR_MAX];
	int64_t avoid_until_ms[MAX_ADDRS];
	int naddrs;
	unsigned next;               /* the address the next pick starts from */
	int64_t looked_up_ms;        /* when the last lookup ended; 0: none has */
	int64_t refresh_ms;
	char error[200];             /* why the last lookup failed; "" if it did not */
};

/* Asks the thread for a lookup unless one is under way or asked for. Caller holds r->lock. */
static void want_lookup_locked(struct akz_resolver *r)
{
	if(r->busy || r->wanted) return;
	r->wanted = true;
	pthread_cond_signal(&r->cond);
}

/* Runs one lookup; fills addrs with up to MAX_ADDRS distinct numeric addresses in the order
 * getaddrinfo() sorts them (RFC 6724). Returns how many, or -1 with the reason in err. */
static int look_up(const char *host, char addrs[MAX_ADDRS][AKZ_ADDR_MAX], char *err, size_t errlen)
{
	/* AI_ADDRCONFIG: no IPv6 addresses on a box without IPv6, and the reverse. */
	struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_ADDRCONFIG};
	struct addrinfo *res = NULL;
	int rc = getaddrinfo(host, NULL, &hints, &res);
	if(rc != 0){
		akz_set_err(err, errlen, "cannot resolve '%s': %s", host,
				rc == EAI_SYSTEM ? strerror(errno) : gai_strerror(rc));
		return -1;
	}
	int n = 0;
	for(struct addrinfo *ai = res; ai && n < MAX_ADDRS; ai = ai->ai_next){
		char buf[AKZ_ADDR_MAX];
		if(getnameinfo(ai->ai_addr, ai->ai_addrlen, buf, sizeof(buf), NULL, 0, NI_NUMERICHOST) != 0) continue;
		bool dup = false;
		for(int i = 0; i < n && !dup; i++) dup = strcmp(addrs[i], buf) == 0;
		if(!dup) memcpy(addrs[n++], buf, sizeof(buf));
	}
	freeaddrinfo(res);
	if(n == 0) akz_set_err(err, errlen, "cannot resolve '%s': no address", host);
	return n > 0 ? n : -1;
}

/* Waits until a lookup is asked for or due: refresh_ms after the last one, RETRY_MS after a
 * failed one. Returns false when told to stop. Caller holds r->lock. */
static bool wait_for_lookup_locked(struct akz_resolver *r)
{
	while(!r->wanted && !r->stop){
		int64_t due = r->looked_up_ms + (r->error[0] ? RETRY_MS : r->refresh_ms);
		struct timespec ts = {.tv_sec = (time_t)(due / 1000), .tv_nsec = (long)(due % 1000) * 1000000L};
		if(pthread_cond_timedwait(&r->cond, &r->lock, &ts) == ETIMEDOUT) r->wanted = true;
	}
	return !r->stop;
}

static void *resolver_main(void *arg)
{
	struct akz_resolver *r = arg;
	char addrs[MAX_ADDRS][AKZ_ADDR_MAX];
	char err[sizeof(r->error)];

	pthread_mutex_lock(&r->lock);
	while(wait_for_lookup_locked(r)){
		r->wanted = false;
		r->busy = true;
		pthread_mutex_unlock(&r->lock);
		int n = look_up(r->host, addrs, err, sizeof(err));
		pthread_mutex_lock(&r->lock);
		r->busy = false;
		r->looked_up_ms = akz_mono_ms();
		if(n < 0){
			memcpy(r->error, err, sizeof(err));   /* the old addresses stay in use */
			continue;
		}
		r->error[0] = '\0';
		memcpy(r->addrs, addrs, sizeof(addrs));
		memset(r->avoid_until_ms, 0, sizeof(r->avoid_until_ms));
		r->naddrs = n;
		r->next = 0;
	}
	pthread_mutex_unlock(&r->lock);
	return NULL;
}

int akz_resolver_new(const char *host, int refresh_s, struct akz_resolver **out,
		char *err, size_t errlen)
{
	*out = NULL;
	struct akz_resolver *r = calloc(1, sizeof(*r));
	if(r == NULL || (r->host = strdup(host)) == NULL){
		free(r);
		akz_set_err(err, errlen, "out of memory");
		return -1;
	}
	r->numeric = akz_is_ip_literal(host);
	r->refresh_ms = (int64_t)refresh_s * 1000;
	pthread_mutex_init(&r->lock, NULL);
	/* The lookup timer runs on the monotonic clock: a wall-clock step must not stop it. */
	akz_cond_init_monotonic(&r->cond);
	if(!r->numeric){
		r->wanted = true;
		if(akz_thread_start(&r->thread, "lookup", resolver_main, r, err, errlen)){
			akz_resolver_free(r);
			return -1;
		}
	}
	*out = r;
	return 0;
}

/* Caller holds r->lock. */
static enum akz_resolve state_locked(const struct akz_resolver *r)
{
	if(r->naddrs > 0) return AKZ_RESOLVE_OK;
	return r->looked_up_ms == 0 || r->error[0] == '\0' ? AKZ_RESOLVE_PENDING : AKZ_RESOLVE_FAILED;
}

enum akz_resolve akz_resolver_state(struct akz_resolver *r)
{
	if(r->numeric) return AKZ_RESOLVE_OK;
	pthread_mutex_lock(&r->lock);
	enum akz_resolve st = state_locked(r);
	pthread_mutex_unlock(&r->lock);
	return st;
}

enum akz_resolve akz_resolver_pick(struct akz_resolver *r, char *addr, char *err, size_t errlen)
{
	if(r->numeric){
		snprintf(addr, AKZ_ADDR_MAX, "%s", r->host);
		return AKZ_RESOLVE_OK;
	}
	int64_t now = akz_mono_ms();
	pthread_mutex_lock(&r->lock);
	enum akz_resolve st = state_locked(r);
	if(st == AKZ_RESOLVE_FAILED) akz_set_err(err, errlen, "%s", r->error);
	if(st == AKZ_RESOLVE_OK){
		int pick = (int)(r->next % (unsigned)r->naddrs);
		for(int i = 0; i < r->naddrs; i++){
			int k = (int)((r->next + (unsigned)i) % (unsigned)r->naddrs);
			if(r->avoid_until_ms[k] <= now){
				pick = k;
				break;
			}
		}
		r->next = (unsigned)pick + 1;
		memcpy(addr, r->addrs[pick], AKZ_ADDR_MAX);
	}
	pthread_mutex_unlock(&r->lock);
	return st;
}

void akz_resolver_failed(struct akz_resolver *r, const char *addr)
{
	if(r->numeric) return;
	int64_t now = akz_mono_ms();
	pthread_mutex_lock(&r->lock);
	for(int i = 0; i < r->naddrs; i++){
		if(strcmp(r->addrs[i], addr) == 0) r->avoid_until_ms[i] = now + AVOID_MS;
	}
	if(now - r->looked_up_ms >= RETRY_MS) want_lookup_locked(r);
	pthread_mutex_unlock(&r->lock);
}

void akz_resolver_free(struct akz_resolver *r)
{
	if(r == NULL) return;
	akz_thread_stop_sleeper(&r->thread, &r->lock, &r->cond, &r->stop);
	pthread_mutex_destroy(&r->lock);
	pthread_cond_destroy(&r->cond);
	free(r->host);
	free(r);
}
