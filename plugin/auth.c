/* auth.c - local username/password checks for registry users, with a cache and brute-force brakes. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include "akz_mosquitto.h"
#include "akz_auth.h"
#include "akz_config.h"
#include "akz_passwd.h"
#include "akz_registry.h"
#include "akz_util.h"

#define NBUCKETS 4096
#define MAX_ENTRIES 100000     /* bounds the memory an attacker can make us spend on usernames */
#define FAIL_LIMIT 5           /* failures within FAIL_WINDOW_MS before a lockout */
#define FAIL_WINDOW_MS 60000
#define LOCK_MIN_MS 5000
#define LOCK_MAX_MS 300000

/* What is remembered about one username. */
struct entry {
	struct entry *next;
	unsigned char mac[32];     /* HMAC(process key, password, stored hash) of the last success */
	int64_t cached_until_ms;
	int fails;
	int64_t first_fail_ms;
	int64_t locked_until_ms;
	int lockouts;              /* consecutive lockouts: each one doubles the next */
	char username[];
};

struct akz_auth {
	unsigned char key[32];     /* random per process: a cached MAC is useless anywhere else */
	struct entry *buckets[NBUCKETS];
	size_t nentries;
};

static size_t bucket_of(const char *s)
{
	size_t h = 1469598103934665603ULL;
	while(*s){
		h ^= (unsigned char)*s++;
		h *= 1099511628211ULL;
	}
	return h % NBUCKETS;
}

struct akz_auth *akz_auth_new(void)
{
	struct akz_auth *a = calloc(1, sizeof(*a));
	if(a && RAND_bytes(a->key, sizeof(a->key)) != 1){
		free(a);
		return NULL;
	}
	return a;
}

static void free_entries(struct akz_auth *a)
{
	for(size_t i = 0; i < NBUCKETS; i++){
		struct entry *e = a->buckets[i];
		while(e){
			struct entry *next = e->next;
			OPENSSL_cleanse(e->mac, sizeof(e->mac));
			free(e);
			e = next;
		}
		a->buckets[i] = NULL;
	}
	a->nentries = 0;
}

void akz_auth_free(struct akz_auth *a)
{
	if(a == NULL) return;
	free_entries(a);
	OPENSSL_cleanse(a->key, sizeof(a->key));
	free(a);
}

void akz_auth_invalidate(struct akz_auth *a)
{
	for(size_t i = 0; i < NBUCKETS; i++){
		for(struct entry *e = a->buckets[i]; e; e = e->next) e->cached_until_ms = 0;
	}
}

/* Drops entries that carry nothing worth keeping. */
static void prune(struct akz_auth *a, int64_t now)
{
	for(size_t i = 0; i < NBUCKETS; i++){
		for(struct entry **pp = &a->buckets[i]; *pp;){
			struct entry *e = *pp;
			if(e->cached_until_ms < now && e->locked_until_ms < now
					&& (e->fails == 0 || now - e->first_fail_ms > FAIL_WINDOW_MS)){
				*pp = e->next;
				free(e);
				a->nentries--;
			}else{
				pp = &e->next;
			}
		}
	}
}

/* The entry of username, created if missing. NULL when out of memory or the table is full. */
static struct entry *entry_of(struct akz_auth *a, const char *username, int64_t now)
{
	size_t b = bucket_of(username);
	for(struct entry *e = a->buckets[b]; e; e = e->next){
		if(strcmp(e->username, username) == 0) return e;
	}
	if(a->nentries >= MAX_ENTRIES) prune(a, now);
	if(a->nentries >= MAX_ENTRIES) return NULL;
	size_t len = strlen(username);
	struct entry *e = calloc(1, sizeof(*e) + len + 1);
	if(e == NULL) return NULL;
	memcpy(e->username, username, len + 1);
	e->next = a->buckets[b];
	a->buckets[b] = e;
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

static void log_refusal(const struct mosquitto_evt_basic_auth *ev, const char *why)
{
	const char *addr = mosquitto_client_address(ev->client);
	const char *cid = mosquitto_client_id(ev->client);
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "akenza: refused user '%s' (client '%s', address %s): %s",
			ev->username, cid ? cid : "?", addr ? addr : "?", why);
}

/* Counts a failure; starts a lockout at the limit, each one twice as long as the last. */
static void note_failure(struct entry *e, int64_t now, const struct mosquitto_evt_basic_auth *ev)
{
	if(e == NULL) return;
	if(e->fails == 0 || now - e->first_fail_ms > FAIL_WINDOW_MS){
		e->fails = 0;
		e->first_fail_ms = now;
	}
	if(++e->fails < FAIL_LIMIT) return;
	int64_t lock = LOCK_MIN_MS;
	for(int i = 0; i < e->lockouts && lock < LOCK_MAX_MS; i++) lock *= 2;
	if(lock > LOCK_MAX_MS) lock = LOCK_MAX_MS;
	e->lockouts++;
	e->fails = 0;
	e->locked_until_ms = now + lock;
	const char *addr = mosquitto_client_address(ev->client);
	mosquitto_log_printf(MOSQ_LOG_WARNING, "akenza: %d failed logins for user '%s' (last from %s): "
			"refusing it for %lld s", FAIL_LIMIT, ev->username, addr ? addr : "?", (long long)(lock / 1000));
}

int akz_auth_basic(struct akz_auth *auth, const struct akz_registry *reg,
		const struct akz_config *cfg, struct mosquitto_evt_basic_auth *ev)
{
	if(ev->username == NULL) return MOSQ_ERR_PLUGIN_DEFER;
	const struct akz_device *dev = akz_registry_find_device_by_username(reg, ev->username);
	const struct akz_gateway *gw = dev ? NULL : akz_registry_find_gateway(reg, ev->username);
	if(dev == NULL && gw == NULL) return MOSQ_ERR_PLUGIN_DEFER;   /* password_file, dynsec... decide */

	int64_t now = akz_mono_ms();
	struct entry *e = entry_of(auth, ev->username, now);
	if(e && e->locked_until_ms > now){
		char why[96];
		snprintf(why, sizeof(why), "too many failed logins: locked for %lld more s",
				(long long)((e->locked_until_ms - now + 999) / 1000));
		log_refusal(ev, why);
		return MOSQ_ERR_AUTH;
	}
	if(dev && !dev->enabled){
		log_refusal(ev, "device is disabled in the registry");
		return MOSQ_ERR_AUTH;
	}
	if(ev->password == NULL){
		log_refusal(ev, "no password given");
		note_failure(e, now, ev);
		return MOSQ_ERR_AUTH;
	}
	const char *hash = dev ? dev->password : gw->password;
	unsigned char mac[32];
	/* No MAC when caching is off: an HMAC costs as much as a cheap hash check. */
	bool have_mac = cfg->auth_cache_seconds > 0 && make_mac(auth, ev->password, hash, mac) == 0;
	if(e && have_mac && e->cached_until_ms > now && CRYPTO_memcmp(mac, e->mac, sizeof(mac)) == 0){
		OPENSSL_cleanse(mac, sizeof(mac));
		return MOSQ_ERR_SUCCESS;
	}
	struct akz_pw pw;
	char err[256];
	bool ok = akz_pw_parse(hash, &pw, err, sizeof(err)) == 0 && akz_pw_verify(&pw, ev->password);
	if(!ok){
		log_refusal(ev, "wrong password");
		note_failure(e, now, ev);
		OPENSSL_cleanse(mac, sizeof(mac));
		return MOSQ_ERR_AUTH;
	}
	if(e){
		e->fails = 0;
		e->lockouts = 0;
		if(have_mac && cfg->auth_cache_seconds > 0){
			memcpy(e->mac, mac, sizeof(mac));
			e->cached_until_ms = now + (int64_t)cfg->auth_cache_seconds * 1000;
		}
	}
	OPENSSL_cleanse(mac, sizeof(mac));
	return MOSQ_ERR_SUCCESS;
}
