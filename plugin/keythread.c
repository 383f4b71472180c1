/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* keythread.c - the one thread that works with keys held in a provider (a TPM). */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/provider.h>
#include <openssl/store.h>
#include "akz_keythread.h"
#include "akz_util.h"

struct akz_kjob {
	struct akz_kjob *next;       /* queue link, guarded by lock */
	int refs;                    /* guarded by lock: the submitter's and the queue's */
	bool done;                   /* guarded by lock: ran, or skipped */
	bool ran;                    /* guarded by lock: run returned */
	void (*run)(void *arg);
	void *arg;
	void (*free_arg)(void *arg); /* guarded by lock once queued */
};

/* The thread, its queue and its state: one per process, since the device behind it is one. */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t queued;    /* a job was queued, or stop was asked */
static pthread_cond_t finished;  /* a job finished */
static pthread_once_t conds_once = PTHREAD_ONCE_INIT;
static struct akz_kjob *head, *tail;
static struct akz_thread thread;
static bool running;
static uintptr_t generation;     /* guarded by lock: a thread serves while its number is current */
static _Thread_local bool on_key_thread;
static int live_threads;         /* guarded by lock: started and not yet returned (one left
                                    behind in a device call by a stop counts until it returns) */
static int64_t busy_since_ms;    /* guarded by lock: when the running job started (0: idle) */

/* The key thread's library context and what goes into it. The settings are guarded by lock;
 * libctx and provs are the key thread's only (and cleanup's, once the thread is gone). */
#define PROVIDERS_MAX 8
static char *want_providers, *want_conf;
static atomic_int wait_limit_ms = 30000;
static bool configured_used;     /* a key was loaded: the settings are fixed */
static OSSL_LIB_CTX *libctx;
static bool suspect;             /* a job failed in libctx: make it again before the next one */
static OSSL_PROVIDER *provs[PROVIDERS_MAX];
static size_t nprovs;

/* Both condition variables wait on the monotonic clock: a wall-clock step must not stretch or
 * cut a timeout. */
static void init_conds(void)
{
	pthread_condattr_t attr;
	pthread_condattr_init(&attr);
	pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
	pthread_cond_init(&queued, &attr);
	pthread_cond_init(&finished, &attr);
	pthread_condattr_destroy(&attr);
}

/* Drops one reference; the last one frees the job and its argument. Caller holds lock. */
static void unref_locked(struct akz_kjob *job)
{
	if(--job->refs > 0) return;
	if(job->free_arg) job->free_arg(job->arg);
	free(job);
}

static void *key_thread_main(void *arg)
{
	uintptr_t mine = (uintptr_t)arg;
	on_key_thread = true;
	pthread_mutex_lock(&lock);
	/* A thread that a stop left behind in a device call ends when the call returns: a newer
	 * one may be serving the queue by then. */
	while(mine == generation){
		struct akz_kjob *job = head;
		if(job == NULL){
			pthread_cond_wait(&queued, &lock);
			continue;
		}
		head = job->next;
		if(head == NULL) tail = NULL;
		/* Nobody waits for a job its submitter has released: skip it. */
		if(job->refs > 1){
			busy_since_ms = akz_mono_ms();
			pthread_mutex_unlock(&lock);
			job->run(job->arg);
			pthread_mutex_lock(&lock);
			if(mine == generation) busy_since_ms = 0;
			job->ran = true;
		}
		job->done = true;
		pthread_cond_broadcast(&finished);
		unref_locked(job);
	}
	live_threads--;
	pthread_mutex_unlock(&lock);
	return NULL;
}

/* Starts the thread if it is not running. Returns 0, or -1. Caller holds lock. */
static int ensure_thread_locked(void)
{
	if(running) return 0;
	/* The thread gets its generation as its argument: read later, a stop could have moved it. */
	void *gen = (void *)generation;   /* NOLINT(performance-no-int-to-ptr): a number, not an address */
	if(akz_thread_start(&thread, "key", key_thread_main, gen, NULL, 0) != 0) return -1;
	live_threads++;
	running = true;
	return 0;
}

struct akz_kjob *akz_kjob_submit(void (*run)(void *arg), void *arg, void (*free_arg)(void *arg))
{
	pthread_once(&conds_once, init_conds);
	struct akz_kjob *job = calloc(1, sizeof(*job));
	if(job == NULL){
		if(free_arg) free_arg(arg);
		return NULL;
	}
	*job = (struct akz_kjob){.refs = 2, .run = run, .arg = arg, .free_arg = free_arg};
	pthread_mutex_lock(&lock);
	if(ensure_thread_locked()){
		pthread_mutex_unlock(&lock);
		if(free_arg) free_arg(arg);
		free(job);
		return NULL;
	}
	if(tail) tail->next = job;
	else head = job;
	tail = job;
	pthread_cond_signal(&queued);
	pthread_mutex_unlock(&lock);
	return job;
}

bool akz_kjob_done(const struct akz_kjob *job)
{
	pthread_mutex_lock(&lock);
	bool done = job->done;
	pthread_mutex_unlock(&lock);
	return done;
}

bool akz_kjob_wait(struct akz_kjob *job, int timeout_ms)
{
	struct timespec until;
	clock_gettime(CLOCK_MONOTONIC, &until);
	until.tv_sec += timeout_ms / 1000;
	until.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
	if(until.tv_nsec >= 1000000000L){
		until.tv_sec++;
		until.tv_nsec -= 1000000000L;
	}
	pthread_mutex_lock(&lock);
	while(!job->done){
		if(pthread_cond_timedwait(&finished, &lock, &until) == ETIMEDOUT) break;
	}
	bool ran = job->ran;
	pthread_mutex_unlock(&lock);
	return ran;
}

void akz_kjob_release(struct akz_kjob *job)
{
	if(job == NULL) return;
	pthread_mutex_lock(&lock);
	unref_locked(job);
	pthread_mutex_unlock(&lock);
}

bool akz_kjob_call(void (*run)(void *arg), void *arg, void (*free_arg)(void *arg), int timeout_ms)
{
	if(on_key_thread){
		run(arg);
		return true;
	}
	/* Stuck longer than this caller would wait already: a reload naming ten keys in a TPM that
	 * hangs must not wait ten times. */
	if(akz_keythread_busy_ms() > timeout_ms){
		if(free_arg) free_arg(arg);
		return false;
	}
	struct akz_kjob *job = akz_kjob_submit(run, arg, free_arg);
	if(job == NULL) return false;
	bool ran = akz_kjob_wait(job, timeout_ms);
	pthread_mutex_lock(&lock);
	if(ran) job->free_arg = NULL;   /* the caller has its argument back */
	unref_locked(job);
	pthread_mutex_unlock(&lock);
	return ran;
}

int64_t akz_keythread_busy_ms(void)
{
	pthread_mutex_lock(&lock);
	int64_t since = busy_since_ms;
	pthread_mutex_unlock(&lock);
	return since ? akz_mono_ms() - since : 0;
}

bool akz_keythread_current(void)
{
	return on_key_thread;
}

void akz_keythread_stop(int wait_ms)
{
	pthread_mutex_lock(&lock);
	configured_used = false;
	if(!running){
		pthread_mutex_unlock(&lock);
		return;
	}
	generation++;
	busy_since_ms = 0;
	/* Queued jobs will not run: mark them done, so that waiters return, and drop the queue's
	 * references. */
	while(head){
		struct akz_kjob *job = head;
		head = job->next;
		job->done = true;
		unref_locked(job);
	}
	tail = NULL;
	pthread_cond_broadcast(&finished);
	pthread_cond_broadcast(&queued);
	running = false;
	pthread_mutex_unlock(&lock);

	struct timespec until;
	clock_gettime(CLOCK_REALTIME, &until);   /* pthread_timedjoin_np takes the wall clock */
	until.tv_sec += wait_ms / 1000 + 1;
	thread.running = false;   /* joined or detached here, not by akz_thread_stop */
	if(pthread_timedjoin_np(thread.id, NULL, &until) != 0){
		pthread_detach(thread.id);
		/* left behind: it ends when its call returns (key_thread_main) */
	}
}

/* ---- the library context ------------------------------------------------------------- */

/* Replaces a setting (NULL: unset). Returns 0, or -1 when out of memory. Caller holds lock. */
static int set_string(char **dst, const char *value)
{
	char *copy = value ? strdup(value) : NULL;
	if(value && copy == NULL) return -1;
	free(*dst);
	*dst = copy;
	return 0;
}

int akz_keythread_configure(const char *providers, const char *conf_file, char *err, size_t errlen)
{
	if(conf_file && access(conf_file, R_OK) != 0){
		akz_set_err(err, errlen, "OpenSSL configuration %s: %s", conf_file, strerror(errno));
		return -1;
	}
	pthread_mutex_lock(&lock);
	int rc = 0;
	if(configured_used || libctx){
		akz_set_err(err, errlen, "the key providers are set once per process, before the first key is loaded");
		rc = -1;
	}else if(set_string(&want_providers, providers) || set_string(&want_conf, conf_file)){
		akz_set_err(err, errlen, "out of memory");
		rc = -1;
	}
	pthread_mutex_unlock(&lock);
	return rc;
}

void akz_keythread_set_timeout(int ms)
{
	atomic_store(&wait_limit_ms, ms > 0 ? ms : 1);
}

int akz_keythread_timeout_ms(void)
{
	return atomic_load(&wait_limit_ms);
}

/* Unloads the providers and frees the context. Key thread, or cleanup once it is gone. */
static void free_libctx(void)
{
	while(nprovs > 0) OSSL_PROVIDER_unload(provs[--nprovs]);
	OSSL_LIB_CTX_free(libctx);
	libctx = NULL;
}

const char *akz_openssl_error(char *buf, size_t len, bool oldest)
{
	const char *data = NULL;
	int flags = 0;
	unsigned long e = oldest ? ERR_peek_error_data(&data, &flags) : ERR_peek_last_error_data(&data, &flags);
	if(e == 0){
		snprintf(buf, len, "unknown error");
		return buf;
	}
	char code[128];
	const char *reason = ERR_reason_error_string(e);
	if(reason == NULL){
		ERR_error_string_n(e, code, sizeof(code));
		reason = code;
	}
	bool detail = data && (flags & ERR_TXT_STRING) && data[0];
	snprintf(buf, len, "%s%s%s", reason, detail ? ": " : "", detail ? data : "");
	return buf;
}

/* Loads the configured file and providers into a new context. Returns 0, or -1 with a reason. */
static int load_libctx(const char *providers, const char *conf, char *err, size_t errlen)
{
	char why[256];
	libctx = OSSL_LIB_CTX_new();
	if(libctx == NULL){
		akz_set_err(err, errlen, "out of memory");
		return -1;
	}
	ERR_clear_error();
	if(conf && OSSL_LIB_CTX_load_config(libctx, conf) != 1){
		akz_set_err(err, errlen, "OpenSSL configuration %s: %s", conf, akz_openssl_error(why, sizeof(why), true));
		free_libctx();
		return -1;
	}
	char list[512];
	snprintf(list, sizeof(list), "%s", providers ? providers : "");
	char *save = NULL;
	for(char *name = strtok_r(list, ", \t", &save); name; name = strtok_r(NULL, ", \t", &save)){
		OSSL_PROVIDER *prov = nprovs < PROVIDERS_MAX ? OSSL_PROVIDER_load(libctx, name) : NULL;
		if(prov == NULL){
			akz_set_err(err, errlen, "cannot load OpenSSL provider %s (a device's provider starts only "
					"with its device reachable and open to this user): %s", name,
					nprovs < PROVIDERS_MAX ? akz_openssl_error(why, sizeof(why), true) : "too many providers");
			free_libctx();
			return -1;
		}
		provs[nprovs++] = prov;
	}
	ERR_clear_error();
	return 0;
}

/* Fails with a reason unless provider `need` (NULL: none) is available in the context. */
static int check_available(const char *need, char *err, size_t errlen)
{
	if(need == NULL || OSSL_PROVIDER_available(libctx, need)) return 0;
	char why[256];
	bool known = ERR_peek_error() != 0;
	akz_set_err(err, errlen, "the OpenSSL provider %s is not loaded (plugin_opt_providers, akenzactl "
			"--providers)%s%s", need, known ? ": " : "", known ? akz_openssl_error(why, sizeof(why), true) : "");
	return -1;
}

int akz_keythread_libctx(const char *need, OSSL_LIB_CTX **ctx, char *err, size_t errlen)
{
	pthread_mutex_lock(&lock);
	configured_used = true;
	bool own = want_providers || want_conf;
	char *providers = want_providers ? strdup(want_providers) : NULL;
	char *conf = want_conf ? strdup(want_conf) : NULL;
	pthread_mutex_unlock(&lock);

	int rc = 0;
	*ctx = NULL;
	if((want_providers && providers == NULL) || (want_conf && conf == NULL)){
		akz_set_err(err, errlen, "out of memory");
		rc = -1;
	}else if(own){
		/* A provider that failed to start (its TPM absent) is tried again: a configuration
		 * file leaves it out without failing, so check for the one this job needs. */
		if(libctx && (suspect || (need && !OSSL_PROVIDER_available(libctx, need)))) free_libctx();
		suspect = false;
		rc = libctx == NULL ? load_libctx(providers, conf, err, errlen) : 0;
		if(rc == 0) rc = check_available(need, err, errlen);
		if(rc == 0) *ctx = libctx;
	}else{
		rc = check_available(need, err, errlen);
	}
	free(providers);
	free(conf);
	return rc;
}

struct loader_query {
	char scheme[32];
	int answer;
};

/* Looks for an OSSL_STORE loader of q->scheme in the key thread's context. Key thread. */
static void run_has_loader(void *arg)
{
	struct loader_query *q = arg;
	OSSL_LIB_CTX *ctx;
	char why[256];
	q->answer = -1;
	if(akz_keythread_libctx(NULL, &ctx, why, sizeof(why))) return;
	ERR_set_mark();
	OSSL_STORE_LOADER *l = OSSL_STORE_LOADER_fetch(ctx, q->scheme, NULL);
	ERR_pop_to_mark();
	q->answer = l != NULL;
	OSSL_STORE_LOADER_free(l);
}

int akz_keythread_has_loader(const char *scheme)
{
	pthread_mutex_lock(&lock);
	bool own = want_providers || want_conf;
	pthread_mutex_unlock(&lock);
	if(!own) return 0;
	struct loader_query *q = calloc(1, sizeof(*q));
	if(q == NULL) return -1;
	if(snprintf(q->scheme, sizeof(q->scheme), "%s", scheme) >= (int)sizeof(q->scheme)){
		free(q);
		return 0;
	}
	if(!akz_kjob_call(run_has_loader, q, free, akz_keythread_timeout_ms())) return -1;
	int answer = q->answer;
	free(q);
	return answer;
}

void akz_keythread_failed(void)
{
	suspect = true;
}

void akz_keythread_cleanup(void)
{
	akz_keythread_stop(2000);
	pthread_mutex_lock(&lock);
	bool left_behind = live_threads > 0;
	set_string(&want_providers, NULL);
	set_string(&want_conf, NULL);
	configured_used = false;
	pthread_mutex_unlock(&lock);
	if(!left_behind) free_libctx();
}
