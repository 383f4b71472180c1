/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* mint.c - device tokens minted without blocking the caller: keys in a TPM sign on the key thread. */
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include "akz_jwt.h"
#include "akz_keythread.h"
#include "akz_mint.h"
#include "akz_util.h"

/* What the key thread works on: owned by the job (freed with it by free_work). */
struct work {
	struct akz_key *key;
	char *audience;              /* NULL: akz_jwt_mint's default */
	char *id;
	long lifetime;
	time_t iat;
	char *token;                 /* the result, or NULL with err */
	char err[512];
};

struct akz_mint {
	struct akz_kjob *kjob;
	struct work *w;              /* readable once the job is done */
};

static void free_work(void *arg)
{
	struct work *w = arg;
	akz_free_secret(w->token);
	akz_key_unref(w->key);
	free(w->audience);
	free(w->id);
	free(w);
}

/* Key thread: signs here, so akz_key_sign_digest runs the device's part directly. */
static void run_mint(void *arg)
{
	struct work *w = arg;
	w->iat = time(NULL);
	w->token = akz_jwt_mint(w->key, w->audience, w->id, w->iat, w->lifetime, w->err, sizeof(w->err));
}

void akz_mint_cancel(struct akz_mint **job)
{
	if(*job == NULL) return;
	akz_kjob_release((*job)->kjob);
	free(*job);
	*job = NULL;
}

/* Starts minting on the key thread. Returns the job, or NULL with a reason. */
static struct akz_mint *start(struct akz_key *key, const char *audience, const char *device_id,
		long lifetime, char *err, size_t errlen)
{
	struct akz_mint *m = calloc(1, sizeof(*m));
	struct work *w = calloc(1, sizeof(*w));
	if(m == NULL || w == NULL || (w->id = strdup(device_id)) == NULL
			|| (audience && (w->audience = strdup(audience)) == NULL)){
		free(m);
		if(w){
			free(w->id);
			free(w->audience);
		}
		free(w);
		akz_set_err(err, errlen, "out of memory");
		return NULL;
	}
	w->key = akz_key_ref(key);
	w->lifetime = lifetime;
	m->w = w;
	m->kjob = akz_kjob_submit(run_mint, w, free_work);
	if(m->kjob == NULL){
		free(m);
		akz_set_err(err, errlen, "%s: cannot start the key thread", akz_key_uri(key));
		return NULL;
	}
	return m;
}

/* True if the job's token is for these claims. */
static bool same_claims(const struct work *w, const struct akz_key *key, const char *audience, long lifetime)
{
	return w->key == key && w->lifetime == lifetime
			&& (w->audience == audience || (w->audience && audience && strcmp(w->audience, audience) == 0));
}

enum akz_mint_rc akz_mint_poll(struct akz_mint **job, struct akz_key *key, const char *audience,
		const char *device_id, long lifetime, int timeout_ms, char *err, size_t errlen)
{
	if(!akz_key_held(key)){
		akz_mint_cancel(job);
		return AKZ_MINT_DONE;
	}
	struct akz_mint *m = *job;
	if(m && !same_claims(m->w, key, audience, lifetime)) akz_mint_cancel(job);
	if(m && *job && akz_kjob_done(m->kjob)){
		if(m->w->token == NULL){
			akz_set_err(err, errlen, "%s", m->w->err[0] ? m->w->err : "the key thread stopped");
			akz_mint_cancel(job);
			return AKZ_MINT_FAILED;
		}
		if(time(NULL) - m->w->iat <= lifetime / 10) return AKZ_MINT_DONE;
		akz_mint_cancel(job);   /* waited too long for a connect slot: mint a fresher one */
	}
	if(*job == NULL){
		*job = start(key, audience, device_id, lifetime, err, errlen);
		return *job ? AKZ_MINT_PENDING : AKZ_MINT_FAILED;
	}
	int64_t busy = akz_keythread_busy_ms();
	if(busy > timeout_ms){
		akz_set_err(err, errlen, "%s: no answer from the key's device for %lld ms",
				akz_key_uri(key), (long long)busy);
		akz_mint_cancel(job);
		return AKZ_MINT_FAILED;
	}
	return AKZ_MINT_PENDING;
}

char *akz_mint_take(struct akz_mint **job, struct akz_key *key, const char *audience,
		const char *device_id, time_t now, long lifetime, time_t *iat, char *err, size_t errlen)
{
	struct akz_mint *m = *job;
	if(m && same_claims(m->w, key, audience, lifetime) && akz_kjob_done(m->kjob) && m->w->token){
		char *tok = m->w->token;
		m->w->token = NULL;
		*iat = m->w->iat;
		akz_mint_cancel(job);
		return tok;
	}
	akz_mint_cancel(job);
	if(akz_key_held(key)){
		/* Signing here would wait on the device: the caller polls until the token is ready. */
		akz_set_err(err, errlen, "%s: the token is not signed yet", akz_key_uri(key));
		return NULL;
	}
	*iat = now;
	return akz_jwt_mint(key, audience, device_id, now, lifetime, err, errlen);
}
