/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* auth.c - local username/password checks for registry users: a cache, brute-force brakes, a
 * budget for failed checks, equal timing whatever the username, client ids bound to identities. */
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include "akz_mosquitto.h"
#include "akz_auth.h"
#include "akz_config.h"
#include "akz_htab.h"
#include "akz_passwd.h"
#include "akz_registry.h"
#include "akz_util.h"
#include "akz_wakeup.h"

#define MAX_ENTRIES 100000     /* bounds the memory an attacker can make us spend on names */
#define FAIL_LIMIT 5           /* failures within FAIL_WINDOW_MS before a lockout */
#define FAIL_WINDOW_MS 60000
#define LOCK_MIN_MS 5000
#define LOCK_MAX_MS 300000
/* A password refused (or passed on to the broker) is answered again without a check for this
 * long after it was last tried: a sensor retrying an old password costs one check, not one per
 * retry, and a repeat takes as long for every kind of username. */
#define SEEN_MS 60000
/* The budget of failed checks: the broker thread spends at most BUDGET_RATE_US of each second on
 * password checks that do not log anyone in (wrong passwords, disabled devices, the equalizing
 * check of other usernames), and one address at most ADDR_RATE_US of it, so that one address
 * alone cannot use it all. Beyond it a login is answered at once without a check. Successful
 * checks are not charged: a restart's reconnecting devices are not slowed down. */
#define BUDGET_RATE_US 200000
#define ADDR_RATE_US 100000
/* Both may hold up to this many checks' worth of time (and at least BURST_MIN_US), so that a few
 * failures in a row, an admin's first login and a mistyped password, do not make the next login
 * from that address wait, however slow a check is on this machine. The burst is also the longest
 * the broker thread spends on failed checks at a stretch. */
#define BURST_CHECKS 3
#define BURST_MIN_US 300000
#define REPORT_MS 10000        /* one summary line at most this often */
#define CIDS_PER_USER 8        /* client ids bound to one identity; the oldest gives way */
/* Mosquitto 2.1 can answer a login later (MOSQ_ERR_AUTH_DELAYED, then mosquitto_complete_basic_auth
 * on the broker thread): a registry user's check then runs on a thread of the plugin's own. Its
 * value in 2.1's headers; the plugin is built against 2.0's and finds 2.1 at run time. */
#define AKZ_ERR_AUTH_DELAYED (-5)
#define OFFLOAD_MAX 64         /* checks waiting for that thread; beyond, on the broker thread */

enum kind { K_USER, K_ADDR, K_CID };

/* A token bucket of broker-thread time, in microseconds; it may go below zero by one check. */
struct bucket {
	int64_t balance_us;
	int64_t at_us;
};

/* What is remembered about one username (K_USER), client address (K_ADDR) or bound client id
 * (K_CID), in the table of its kind keyed by name. */
struct entry {
	struct akz_htab_node node;
	enum kind kind;
	union {
		struct {
			unsigned char ok_mac[32];    /* HMAC(process key, password, stored hash) of the last success */
			int64_t ok_until_ms;
			unsigned char seen_mac[32];  /* the same of the last password that did not log in */
			int64_t seen_until_ms;
			int fails;
			int64_t first_fail_ms;
			int64_t locked_until_ms;
			int lockouts;                /* consecutive lockouts: each one doubles the next */
			bool lock_logged;
			struct entry *cids[CIDS_PER_USER];   /* K_CID entries this identity holds */
			unsigned cid_next;
		} u;
		struct {
			struct bucket budget;
			unsigned long refused;           /* answered without a check, this report interval */
		} a;
		struct {
			struct entry *owner;             /* the K_USER entry of the identity */
		} c;
	};
	char *name;   /* its own allocation: the table keeps a pointer to it as the key */
};

/* Counts of the current report interval. */
struct report {
	int64_t since_ms;
	unsigned long over_budget, locked, repeats, checks_failed;
	int64_t failed_us;
	char top_addr[64];
	unsigned long top_count;
};

struct offload;

struct akz_auth {
	unsigned char key[32];     /* random per process: a cached MAC is useless anywhere else */
	struct akz_htab tab[K_CID + 1];   /* one per enum kind */
	size_t nentries;           /* in all three */
	struct bucket budget;
	struct akz_pw dummy;       /* as costly as the registry's costliest hash; matches nothing */
	int64_t check_us;          /* what a check takes here: a moving average of the last ones */
	struct report rep;
	struct offload *off;       /* Mosquitto 2.1: registry users' checks on a thread; else NULL */
	bool answer_now;           /* until the next TICK: no delayed answers (a reload's re-checks) */
};

/* The most time a budget may hold. */
static int64_t burst_us(const struct akz_auth *a)
{
	int64_t b = BURST_CHECKS * a->check_us;
	return b > BURST_MIN_US ? b : BURST_MIN_US;
}

static void refill(struct bucket *b, int64_t now_us, int64_t rate, int64_t burst)
{
	int64_t dt = now_us - b->at_us;
	b->at_us = now_us;
	if(dt > 0) b->balance_us += dt * rate / 1000000;
	if(b->balance_us > burst) b->balance_us = burst;
}

/* Sets the dummy: a check nobody can pass, costing what the costliest hash of reg (may be NULL)
 * costs. Never fails. */
static void make_dummy(struct akz_auth *a, const struct akz_registry *reg)
{
	struct akz_pw pw, best = {.kind = AKZ_PW_PBKDF2, .iterations = AKZ_PW_ITERATIONS_DEFAULT};
	bool found = false;
	char err[8];
	size_t nd = akz_registry_device_count(reg), ng = akz_registry_gateway_count(reg);
	for(size_t i = 0; reg && i < nd + ng; i++){
		const char *h = i < nd ? akz_registry_device_at(reg, i)->password : akz_registry_gateway_at(reg, i - nd)->password;
		if(akz_pw_parse(h, &pw, err, sizeof(err)) != 0) continue;
		int cost = pw.kind == AKZ_PW_PBKDF2 ? pw.iterations : 0;
		int best_cost = best.kind == AKZ_PW_PBKDF2 ? best.iterations : 0;
		if(!found || cost > best_cost) best = pw;
		found = true;
	}
	a->dummy.kind = best.kind;
	a->dummy.iterations = best.iterations;
	if(RAND_bytes(a->dummy.salt, sizeof(a->dummy.salt)) != 1 || RAND_bytes(a->dummy.hash, sizeof(a->dummy.hash)) != 1){
		memset(a->dummy.hash, 0, sizeof(a->dummy.hash));   /* still matches nothing in practice */
	}
	OPENSSL_cleanse(&pw, sizeof(pw));
	OPENSSL_cleanse(&best, sizeof(best));
}

/* A finished check, and what the login had shown before it. */
struct outcome {
	bool registry, usable;     /* a registry user; not a disabled device */
	bool ok;                   /* the password matched (and the user is usable) */
	int64_t took_us;
	int64_t reserved_us;       /* taken from the budgets when the check started on the thread */
	unsigned char mac[32];     /* make_mac of the password and the stored hash */
	bool have_mac;
};

/* Checks password against hash (a registry hash, parsed here) or against pw (the dummy). Returns
 * whether it matched, and the time it took in *took_us. Any thread; never fails otherwise. */
static bool check(const char *hash, const struct akz_pw *pw, const char *password, int64_t *took_us)
{
	int64_t t0 = akz_mono_us();
	struct akz_pw parsed;
	char err[256];
	bool ok = true;
	if(hash){
		ok = akz_pw_parse(hash, &parsed, err, sizeof(err)) == 0;
		pw = &parsed;
	}
	ok = ok && pw && akz_pw_verify(pw, password);
	OPENSSL_cleanse(&parsed, sizeof(parsed));
	*took_us = akz_mono_us() - t0;
	return ok;
}

/* ---- Mosquitto 2.1: checks off the broker thread ----------------------------------------------- */

/* One registry user's check, handed to the offload thread. Owns copies of everything. */
struct job {
	struct job *next;
	char *username, *clientid, *addr, *hash;
	char *password;            /* cleansed and freed once checked */
	struct outcome o;
};

struct offload {
	void (*complete)(const char *clientid, int result);   /* mosquitto_complete_basic_auth */
	struct akz_wakeup *wakeup;
	struct akz_thread thread;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct job *todo, *todo_tail, *done;
	size_t pending;            /* jobs not yet completed */
	bool stop;
};

static void free_job(struct job *j)
{
	if(j == NULL) return;
	akz_free_secret(j->password);
	free(j->username);
	free(j->clientid);
	free(j->addr);
	free(j->hash);
	OPENSSL_cleanse(j, sizeof(*j));
	free(j);
}

/* The offload thread: checks jobs in turn and hands them back, waking the broker thread. */
static void *offload_main(void *arg)
{
	struct offload *off = arg;
	pthread_mutex_lock(&off->lock);
	while(!off->stop){
		struct job *j = off->todo;
		if(j == NULL){
			/* A wake-up that landed just before the broker slept is sent again. */
			int ms = akz_wakeup_recheck(off->wakeup);
			if(ms < 0){
				pthread_cond_wait(&off->cond, &off->lock);
			}else{
				struct timespec ts;
				clock_gettime(CLOCK_MONOTONIC, &ts);   /* akz_cond_init_monotonic */
				ts.tv_nsec += (long)ms * 1000000L;
				ts.tv_sec += ts.tv_nsec / 1000000000L;
				ts.tv_nsec %= 1000000000L;
				pthread_cond_timedwait(&off->cond, &off->lock, &ts);
			}
			continue;
		}
		off->todo = j->next;
		if(off->todo == NULL) off->todo_tail = NULL;
		pthread_mutex_unlock(&off->lock);
		j->o.ok = check(j->hash, NULL, j->password, &j->o.took_us) && j->o.usable;
		OPENSSL_cleanse(j->password, strlen(j->password));
		pthread_mutex_lock(&off->lock);
		j->next = off->done;
		off->done = j;
		akz_wakeup_poke(off->wakeup);
	}
	pthread_mutex_unlock(&off->lock);
	return NULL;
}

/* Starts checks off the broker thread if the broker can take answers later (Mosquitto 2.1).
 * Returns the offload, or NULL: the broker cannot (2.0), or the thread or the wake-up cannot be
 * had (logged); checks then run on the broker thread. */
static struct offload *offload_start(void)
{
	void (*complete)(const char *, int);
	*(void **)&complete = dlsym(RTLD_DEFAULT, "mosquitto_complete_basic_auth");
	if(complete == NULL) return NULL;
	struct offload *off = calloc(1, sizeof(*off));
	char err[256] = "out of memory";
	if(off == NULL) goto fail;
	off->complete = complete;
	pthread_mutex_init(&off->lock, NULL);
	if(akz_cond_init_monotonic(&off->cond) != 0){
		snprintf(err, sizeof(err), "cannot set up a condition variable");
		pthread_mutex_destroy(&off->lock);
		free(off);
		off = NULL;
		goto fail;
	}
	if(akz_wakeup_new(&off->wakeup, err, sizeof(err)) != 0) goto fail;
	if(akz_thread_start(&off->thread, "logins", offload_main, off, err, sizeof(err)) != 0){
		akz_wakeup_free(off->wakeup);
		goto fail;
	}
	mosquitto_log_printf(MOSQ_LOG_INFO, "akenza: registry users' password checks run on a thread of "
			"their own (the broker answers their logins later)");
	return off;
fail:
	if(off){
		pthread_cond_destroy(&off->cond);
		pthread_mutex_destroy(&off->lock);
		free(off);
	}
	mosquitto_log_printf(MOSQ_LOG_WARNING, "akenza: password checks stay on the broker thread: %s", err);
	return NULL;
}

/* Stops the thread; jobs not completed are dropped (the broker is going away). NULL is ignored. */
static void offload_stop(struct offload *off)
{
	if(off == NULL) return;
	akz_thread_stop_sleeper(&off->thread, &off->lock, &off->cond, &off->stop);
	akz_wakeup_free(off->wakeup);
	for(struct job *lists[2] = {off->todo, off->done}, **l = lists; l < lists + 2; l++){
		while(*l){
			struct job *next = (*l)->next;
			free_job(*l);
			*l = next;
		}
	}
	pthread_cond_destroy(&off->cond);
	pthread_mutex_destroy(&off->lock);
	free(off);
}

struct akz_auth *akz_auth_new(bool off_thread)
{
	struct akz_auth *a = calloc(1, sizeof(*a));
	if(a && RAND_bytes(a->key, sizeof(a->key)) != 1){
		free(a);
		return NULL;
	}
	if(a){
		a->budget = (struct bucket){.balance_us = BURST_MIN_US, .at_us = akz_mono_us()};
		a->rep.since_ms = akz_mono_ms();
		make_dummy(a, NULL);
		a->off = off_thread ? offload_start() : NULL;
	}
	return a;
}

static void free_entry(struct entry *e)
{
	akz_free_secret(e->name);
	OPENSSL_cleanse(e, sizeof(*e));
	free(e);
}

/* The entry after e in its kind's table (or the first with e NULL), or NULL. */
static struct entry *next_entry(const struct akz_auth *a, enum kind kind, const struct entry *e)
{
	const struct akz_htab *t = &a->tab[kind];
	struct akz_htab_node *n = e ? akz_htab_next(t, &e->node) : akz_htab_first(t);
	return n ? akz_container_of(n, struct entry, node) : NULL;
}

/* Unlinks e from its table and frees it. */
static void remove_entry(struct akz_auth *a, struct entry *e)
{
	akz_htab_remove(&a->tab[e->kind], &e->node);
	free_entry(e);
	a->nentries--;
}

static void free_entries(struct akz_auth *a)
{
	for(enum kind k = K_USER; k <= K_CID; k++){
		for(struct entry *e = next_entry(a, k, NULL), *next; e; e = next){
			next = next_entry(a, k, e);
			free_entry(e);
		}
		akz_htab_free(&a->tab[k]);
	}
	a->nentries = 0;
}

void akz_auth_free(struct akz_auth *a)
{
	if(a == NULL) return;
	offload_stop(a->off);
	free_entries(a);
	OPENSSL_cleanse(a, sizeof(*a));
	free(a);
}

/* Drops every client id the identity of user entry u holds. */
static void release_cids(struct akz_auth *a, struct entry *u)
{
	for(size_t i = 0; i < CIDS_PER_USER; i++){
		if(u->u.cids[i]) remove_entry(a, u->u.cids[i]);
		u->u.cids[i] = NULL;
	}
}

static bool is_registry_user(const struct akz_registry *reg, const char *username)
{
	return akz_registry_find_device_by_username(reg, username) || akz_registry_find_gateway(reg, username);
}

void akz_auth_sync(struct akz_auth *a, const struct akz_registry *reg)
{
	for(struct entry *e = next_entry(a, K_USER, NULL); e; e = next_entry(a, K_USER, e)){
		/* A cached success stands: its MAC covers the stored hash, so a changed password no
		 * longer matches it, and a disabled or removed user never reaches the cache. A registry
		 * user's remembered refusals do not: its hash or state may have changed, or the username
		 * is new to the registry. Other usernames keep theirs, so a change does not make an
		 * admin's next login cost a check. */
		if(is_registry_user(reg, e->name)) e->u.seen_until_ms = 0;
		else release_cids(a, e);
	}
	make_dummy(a, reg);
}

/* True if e carries nothing worth keeping at now (burst: the budgets' size). */
static bool is_idle(const struct entry *e, int64_t now_ms, int64_t now_us, int64_t burst)
{
	switch(e->kind){
	case K_USER:
		for(size_t i = 0; i < CIDS_PER_USER; i++) if(e->u.cids[i]) return false;
		return e->u.ok_until_ms < now_ms && e->u.seen_until_ms < now_ms && e->u.locked_until_ms < now_ms
				&& (e->u.fails == 0 || now_ms - e->u.first_fail_ms > FAIL_WINDOW_MS);
	case K_ADDR:
		return e->a.budget.balance_us + (now_us - e->a.budget.at_us) * ADDR_RATE_US / 1000000 >= burst;
	case K_CID:
		return false;   /* its owner releases it */
	}
	return false;
}

/* Drops entries that carry nothing worth keeping. */
static void prune(struct akz_auth *a, int64_t now_ms)
{
	int64_t now_us = akz_mono_us();
	for(enum kind k = K_USER; k <= K_CID; k++){
		for(struct entry *e = next_entry(a, k, NULL), *next; e; e = next){
			next = next_entry(a, k, e);
			if(is_idle(e, now_ms, now_us, burst_us(a))) remove_entry(a, e);
		}
	}
}

static struct entry *find_entry(const struct akz_auth *a, enum kind kind, const char *name)
{
	struct akz_htab_node *n = akz_htab_find(&a->tab[kind], name, strlen(name));
	return n ? akz_container_of(n, struct entry, node) : NULL;
}

/* The entry of (kind, name), created if missing. NULL when out of memory or the table is full. */
static struct entry *entry_of(struct akz_auth *a, enum kind kind, const char *name, int64_t now_ms)
{
	struct entry *e = find_entry(a, kind, name);
	if(e) return e;
	if(a->nentries >= MAX_ENTRIES) prune(a, now_ms);
	if(a->nentries >= MAX_ENTRIES) return NULL;
	e = calloc(1, sizeof(*e));
	if(e == NULL) return NULL;
	size_t len = strlen(name);
	e->kind = kind;
	e->name = strdup(name);
	if(e->name == NULL){
		free_entry(e);
		return NULL;
	}
	if(kind == K_ADDR) e->a.budget = (struct bucket){.balance_us = burst_us(a), .at_us = akz_mono_us()};
	if(akz_htab_insert(&a->tab[kind], &e->node, e->name, len)){
		free_entry(e);
		return NULL;
	}
	a->nentries++;
	return e;
}

/* MAC over the password and the stored hash: a changed hash in the registry no longer matches. */
static int make_mac(const struct akz_auth *a, const char *password, const char *hash, unsigned char out[32])
{
	size_t plen = strlen(password), hlen = strlen(hash);
	unsigned int n = 0;
	unsigned char *buf = malloc(plen + 1 + hlen);
	if(buf == NULL) return -1;
	memcpy(buf, password, plen);
	buf[plen] = 0;   /* separator: ("ab","c") and ("a","bc") must differ */
	memcpy(buf + plen + 1, hash, hlen);
	unsigned char *r = HMAC(EVP_sha256(), a->key, sizeof(a->key), buf, plen + 1 + hlen, out, &n);
	OPENSSL_cleanse(buf, plen + 1 + hlen);
	free(buf);
	return r && n == 32 ? 0 : -1;
}

/* Who is logging in: copies or the broker's strings; clientid and addr may be NULL. */
struct who {
	const char *username, *clientid, *addr;
};

static void log_refusal(const struct who *w, const char *why)
{
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "akenza: refused user '%s' (client '%s', address %s): %s",
			akz_esc(w->username), akz_esc(w->clientid ? w->clientid : "?"), akz_esc(w->addr ? w->addr : "?"), why);
}

/* Logs the summary of the last interval, if anything happened in it, and starts the next one. */
static void report_if_due(struct akz_auth *a, int64_t now_ms)
{
	struct report *r = &a->rep;
	if(now_ms - r->since_ms < REPORT_MS) return;
	if(r->over_budget || r->locked || r->repeats || r->checks_failed){
		int64_t span = now_ms - r->since_ms;
		mosquitto_log_printf(MOSQ_LOG_WARNING, "akenza: logins in the last %lld s: %lu failed password "
				"checks took %lld ms (%lld%% of the time; the limit is %d%%, %d%% per address); "
				"answered without a check: %lu over that limit (most from %s: %lu), %lu of locked users, "
				"%lu repeats of a password that had not logged in",
				(long long)(span / 1000), r->checks_failed, (long long)(r->failed_us / 1000),
				(long long)(r->failed_us / 10 / (span > 0 ? span : 1)), BUDGET_RATE_US / 10000,
				ADDR_RATE_US / 10000, r->over_budget, r->top_count ? akz_esc(r->top_addr) : "-", r->top_count,
				r->locked, r->repeats);
	}
	memset(r, 0, sizeof(*r));
	r->since_ms = now_ms;
	for(struct entry *e = next_entry(a, K_ADDR, NULL); e; e = next_entry(a, K_ADDR, e)) e->a.refused = 0;
}

/* Counts a failure; starts a lockout at the limit, each one twice as long as the last. */
static void note_failure(struct entry *e, int64_t now, const struct who *w, bool registry)
{
	if(e == NULL) return;
	if(e->u.fails == 0 || now - e->u.first_fail_ms > FAIL_WINDOW_MS){
		e->u.fails = 0;
		e->u.first_fail_ms = now;
	}
	if(++e->u.fails < FAIL_LIMIT) return;
	int64_t lock = LOCK_MIN_MS;
	for(int i = 0; i < e->u.lockouts && lock < LOCK_MAX_MS; i++) lock *= 2;
	if(lock > LOCK_MAX_MS) lock = LOCK_MAX_MS;
	e->u.lockouts++;
	e->u.fails = 0;
	e->u.locked_until_ms = now + lock;
	e->u.lock_logged = false;
	const char *addr = w->addr ? w->addr : "?";
	if(registry){
		mosquitto_log_printf(MOSQ_LOG_WARNING, "akenza: %d failed logins for user '%s' (last from %s): "
				"refusing it for %lld s", FAIL_LIMIT, akz_esc(w->username), akz_esc(addr), (long long)(lock / 1000));
	}else{
		mosquitto_log_printf(MOSQ_LOG_WARNING, "akenza: %d logins with different passwords for user '%s', "
				"which is not in the registry (last from %s): for %lld s they go to the broker's own "
				"checks at once", FAIL_LIMIT, akz_esc(w->username), akz_esc(addr), (long long)(lock / 1000));
	}
}

/* The identity a client id is reserved for: a device's id or username, a gateway's username.
 * Returns that identity's username, or NULL if the id is nobody's. */
static const char *reserved_for(const struct akz_registry *reg, const char *cid)
{
	const struct akz_device *d = akz_registry_find_device(reg, cid);
	if(d) return d->username;
	d = akz_registry_find_device_by_username(reg, cid);
	if(d) return d->username;
	const struct akz_gateway *g = akz_registry_find_gateway(reg, cid);
	return g ? g->username : NULL;
}

/* Binds the client's id to the identity of user entry u (may be NULL: nothing is recorded),
 * unless it belongs to another identity: reserved for it (its device id or username, its gateway
 * username) or bound to it by an earlier login. Returns NULL, or the refusal's reason written
 * into why (size whylen). */
static const char *bind_client_id(struct akz_auth *a, const struct akz_registry *reg, struct entry *u,
		const char *username, const char *cid, int64_t now_ms, char *why, size_t whylen)
{
	if(cid == NULL) return NULL;
	const char *owner = reserved_for(reg, cid);
	if(owner && strcmp(owner, username) != 0){
		snprintf(why, whylen, "client id '%s' is reserved for registry user '%s'", akz_esc(cid), akz_esc(owner));
		return why;
	}
	struct entry *c = find_entry(a, K_CID, cid);
	if(c && strcmp(c->c.owner->name, username) != 0){
		snprintf(why, whylen, "client id '%s' is bound to registry user '%s', which logged in with it before",
				akz_esc(cid), akz_esc(c->c.owner->name));
		return why;
	}
	if(c || owner || u == NULL) return NULL;   /* bound already, or reserved for this identity */
	c = entry_of(a, K_CID, cid, now_ms);
	if(c == NULL) return NULL;   /* out of memory or table full: the reserved ids still hold */
	struct entry **slot = &u->u.cids[u->u.cid_next++ % CIDS_PER_USER];
	if(*slot) remove_entry(a, *slot);
	*slot = c;
	c->c.owner = u;
	return NULL;
}

/* Takes us microseconds from the budget and from the client's address (a negative us gives them
 * back). */
static void debit(struct akz_auth *a, const char *addr, int64_t us, int64_t now_ms)
{
	a->budget.balance_us -= us;
	struct entry *e = addr ? entry_of(a, K_ADDR, addr, now_ms) : NULL;
	if(e) e->a.budget.balance_us -= us;
}

/* Charges a failed check of us microseconds, of which reserved_us were taken when it started. */
static void charge(struct akz_auth *a, const char *addr, int64_t us, int64_t reserved_us, int64_t now_ms)
{
	debit(a, addr, us - reserved_us, now_ms);
	a->rep.checks_failed++;
	a->rep.failed_us += us;
}

/* True if a check may run now for a client at addr: the budget and the address's share both
 * have time left. Otherwise counts the refusal against addr. */
static bool within_budget(struct akz_auth *a, const char *addr, int64_t now_ms)
{
	int64_t now_us = akz_mono_us();
	refill(&a->budget, now_us, BUDGET_RATE_US, burst_us(a));
	struct entry *e = addr ? find_entry(a, K_ADDR, addr) : NULL;
	if(e) refill(&e->a.budget, now_us, ADDR_RATE_US, burst_us(a));
	if(a->budget.balance_us > 0 && (e == NULL || e->a.budget.balance_us > 0)) return true;
	a->rep.over_budget++;
	if(e == NULL && addr) e = entry_of(a, K_ADDR, addr, now_ms);
	if(e && ++e->a.refused > a->rep.top_count){
		a->rep.top_count = e->a.refused;
		snprintf(a->rep.top_addr, sizeof(a->rep.top_addr), "%s", e->name);
	}
	return false;
}

/* After a good password: binds the client id, or refuses it (logged). Returns the decision. */
static int admit(struct akz_auth *a, const struct akz_registry *reg, struct entry *e, const struct who *w,
		int64_t now)
{
	char why[600];
	if(bind_client_id(a, reg, e, w->username, w->clientid, now, why, sizeof(why))){
		log_refusal(w, why);
		return MOSQ_ERR_AUTH;
	}
	return MOSQ_ERR_SUCCESS;
}

/* Acts on a finished check: times it, caches a success and binds the client id, or charges the
 * failure to the budgets, remembers the password, logs and counts the failure. Returns the
 * decision: MOSQ_ERR_SUCCESS, MOSQ_ERR_AUTH, or MOSQ_ERR_PLUGIN_DEFER for a username outside
 * the registry. Broker thread. */
static int conclude(struct akz_auth *a, const struct akz_registry *reg, const struct akz_config *cfg,
		const struct who *w, struct outcome *o)
{
	int64_t now = akz_mono_ms();
	int64_t burst = burst_us(a);
	a->check_us = a->check_us ? (3 * a->check_us + o->took_us) / 4 : o->took_us;
	if(a->budget.balance_us >= burst) a->budget.balance_us = burst_us(a);   /* a full budget stays full */
	struct entry *e = entry_of(a, K_USER, w->username, now);
	int rc;
	if(o->ok){
		if(e){
			e->u.fails = 0;
			e->u.lockouts = 0;
			if(o->have_mac && cfg->auth_cache_seconds > 0){
				memcpy(e->u.ok_mac, o->mac, sizeof(o->mac));
				e->u.ok_until_ms = now + (int64_t)cfg->auth_cache_seconds * 1000;
			}
		}
		debit(a, w->addr, -o->reserved_us, now);   /* a success costs the budget nothing */
		rc = admit(a, reg, e, w, now);
	}else{
		charge(a, w->addr, o->took_us, o->reserved_us, now);
		if(e && o->have_mac){
			memcpy(e->u.seen_mac, o->mac, sizeof(o->mac));
			e->u.seen_until_ms = now + SEEN_MS;
		}
		if(o->registry) log_refusal(w, o->usable ? "wrong password" : "device is disabled in the registry");
		note_failure(e, now, w, o->registry);
		rc = o->registry ? MOSQ_ERR_AUTH : MOSQ_ERR_PLUGIN_DEFER;
	}
	OPENSSL_cleanse(o->mac, sizeof(o->mac));
	return rc;
}

/* Hands a registry user's check to the offload thread. Returns 0 (the login is answered later by
 * akz_auth_tick), or -1: no offload, too many waiting, no client id, out of memory; the caller
 * checks on the broker thread then. */
static int offload(struct akz_auth *a, const struct who *w, const char *password, const char *hash,
		const struct outcome *o)
{
	struct offload *off = a->off;
	if(off == NULL || a->answer_now || w->clientid == NULL || off->pending >= OFFLOAD_MAX) return -1;
	struct job *j = calloc(1, sizeof(*j));
	if(j == NULL) return -1;
	j->o = *o;
	j->username = strdup(w->username);
	j->clientid = strdup(w->clientid);
	j->addr = w->addr ? strdup(w->addr) : NULL;
	j->hash = strdup(hash);
	j->password = strdup(password);
	if(!j->username || !j->clientid || (w->addr && !j->addr) || !j->hash || !j->password){
		free_job(j);
		return -1;
	}
	/* Checks on the thread are charged when they finish; the time one takes is taken from the
	 * budgets now, so that those waiting cannot start more than the budgets allow. */
	j->o.reserved_us = a->check_us ? a->check_us : BURST_MIN_US / BURST_CHECKS;
	debit(a, w->addr, j->o.reserved_us, akz_mono_ms());
	pthread_mutex_lock(&off->lock);
	if(off->todo_tail) off->todo_tail->next = j;
	else off->todo = j;
	off->todo_tail = j;
	off->pending++;
	pthread_cond_signal(&off->cond);
	pthread_mutex_unlock(&off->lock);
	return 0;
}

bool akz_auth_offloads(const struct akz_auth *a)
{
	return a->off != NULL;
}

void akz_auth_reloading(struct akz_auth *a)
{
	a->answer_now = true;
}

void akz_auth_tick(struct akz_auth *a, const struct akz_registry *reg, const struct akz_config *cfg)
{
	struct offload *off = a->off;
	a->answer_now = false;
	if(off == NULL) return;
	akz_wakeup_ack(off->wakeup);
	pthread_mutex_lock(&off->lock);
	struct job *j = off->done;
	off->done = NULL;
	pthread_mutex_unlock(&off->lock);
	while(j){
		struct job *next = j->next;
		struct who w = {j->username, j->clientid, j->addr};
		/* The registry may have changed while the password was checked: the answer holds only
		 * for the same user with the same hash. */
		const struct akz_device *dev = akz_registry_find_device_by_username(reg, j->username);
		const struct akz_gateway *gw = dev ? NULL : akz_registry_find_gateway(reg, j->username);
		const char *hash = dev ? dev->password : gw ? gw->password : NULL;
		int rc;
		if(hash == NULL || strcmp(hash, j->hash) != 0){
			OPENSSL_cleanse(j->o.mac, sizeof(j->o.mac));
			debit(a, j->addr, -j->o.reserved_us, akz_mono_ms());
			log_refusal(&w, "the registry changed while its password was checked: log in again");
			rc = MOSQ_ERR_AUTH;
		}else{
			j->o.usable = dev == NULL || dev->enabled;
			j->o.ok = j->o.ok && j->o.usable;
			rc = conclude(a, reg, cfg, &w, &j->o);
		}
		off->complete(j->clientid, rc);
		pthread_mutex_lock(&off->lock);
		off->pending--;
		pthread_mutex_unlock(&off->lock);
		free_job(j);
		j = next;
	}
}

int akz_auth_basic(struct akz_auth *auth, const struct akz_registry *reg,
		const struct akz_config *cfg, struct mosquitto_evt_basic_auth *ev)
{
	if(ev->username == NULL) return MOSQ_ERR_PLUGIN_DEFER;   /* anonymous: the broker's decision */
	int64_t now = akz_mono_ms();
	report_if_due(auth, now);
	const struct akz_device *dev = akz_registry_find_device_by_username(reg, ev->username);
	const struct akz_gateway *gw = dev ? NULL : akz_registry_find_gateway(reg, ev->username);
	bool registry = dev || gw;
	/* What a login that does not succeed returns: registry users are refused, everyone else is
	 * for password_file or dynamic-security to decide. Every path below takes the same time for
	 * both kinds: one check, or none. */
	int no = registry ? MOSQ_ERR_AUTH : MOSQ_ERR_PLUGIN_DEFER;
	const struct who w = {ev->username, mosquitto_client_id(ev->client), mosquitto_client_address(ev->client)};

	struct entry *e = find_entry(auth, K_USER, ev->username);
	if(e && e->u.locked_until_ms > now){
		auth->rep.locked++;
		if(registry && !e->u.lock_logged){
			char why[96];
			snprintf(why, sizeof(why), "too many failed logins: locked for %lld more s",
					(long long)((e->u.locked_until_ms - now + 999) / 1000));
			log_refusal(&w, why);
			e->u.lock_logged = true;
		}
		return no;
	}
	if(ev->password == NULL){
		if(registry) log_refusal(&w, "no password given");
		return no;
	}
	const char *hash = dev ? dev->password : gw ? gw->password : "";
	unsigned char mac[32];
	bool have_mac = make_mac(auth, ev->password, hash, mac) == 0;
	bool usable = registry && (dev == NULL || dev->enabled);
	if(e && have_mac && usable && cfg->auth_cache_seconds > 0 && e->u.ok_until_ms > now
			&& CRYPTO_memcmp(mac, e->u.ok_mac, sizeof(mac)) == 0){
		OPENSSL_cleanse(mac, sizeof(mac));
		e->u.fails = 0;   /* a good login ends a run of failures, cached or not */
		e->u.lockouts = 0;
		return admit(auth, reg, e, &w, now);
	}
	if(e && have_mac && e->u.seen_until_ms > now && CRYPTO_memcmp(mac, e->u.seen_mac, sizeof(mac)) == 0){
		OPENSSL_cleanse(mac, sizeof(mac));
		e->u.seen_until_ms = now + SEEN_MS;
		auth->rep.repeats++;
		return no;
	}
	if(!within_budget(auth, w.addr, now)){
		OPENSSL_cleanse(mac, sizeof(mac));
		return no;
	}

	/* The check. A disabled device's and an unknown username's cost the same as a registry
	 * user's, and tell nothing by their timing; their result is never a login. */
	struct outcome o = {.registry = registry, .usable = usable, .have_mac = have_mac};
	memcpy(o.mac, mac, sizeof(mac));
	OPENSSL_cleanse(mac, sizeof(mac));
	if(registry && offload(auth, &w, ev->password, hash, &o) == 0){
		OPENSSL_cleanse(o.mac, sizeof(o.mac));
		return AKZ_ERR_AUTH_DELAYED;
	}
	o.ok = check(registry ? hash : NULL, registry ? NULL : &auth->dummy, ev->password, &o.took_us) && usable;
	return conclude(auth, reg, cfg, &w, &o);
}
