/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* standin_auth.c - the akenza stand-in's auth plugin: checks device JWTs as akenza does (tests only). */
#include <dirent.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <cJSON.h>
#include <openssl/ecdsa.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/core_names.h>
#include "akz_mosquitto.h"
#include "akz_topic.h"

#define EXPORT __attribute__((visibility("default")))
#define TOKEN_MAX 8192

/* A registered public key: what akenza knows after the user uploaded it. */
struct regkey {
	char kid[65];
	char *device;
	EVP_PKEY *pkey;
};

/* A connected, verified client and when its token expires. */
struct session {
	const struct mosquitto *client;
	char *id;
	long long exp;
};

struct standin {
	mosquitto_plugin_id_t *pid;
	char *keys_dir;
	char *observer_password;
	char *audience;              /* plugin_opt_audience: tokens' aud is https://<audience>/devices/<id> */
	long max_skew, max_lifetime;
	struct regkey *keys;
	size_t nkeys;
	struct timespec dir_mtime;
	struct session *sessions;
	size_t nsessions, cap;
	FILE *record;                /* plugin_opt_record_file: every uplink accepted, or NULL */
};

static void refuse_log(const char *id, const char *why)
{
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "standin: refused client '%s': %s", id ? id : "?", why);
}

/* ---- keys ------------------------------------------------------------------------------ */

static int kid_of(EVP_PKEY *pkey, char kid[65])
{
	EVP_PKEY *dup = EVP_PKEY_dup(pkey);
	if(dup == NULL) return -1;
	if(EVP_PKEY_is_a(dup, "EC")){
		EVP_PKEY_set_utf8_string_param(dup, OSSL_PKEY_PARAM_EC_POINT_CONVERSION_FORMAT, "uncompressed");
	}
	unsigned char *der = NULL, md[32];
	unsigned int mdlen = 0;
	int len = i2d_PUBKEY(dup, &der);
	EVP_PKEY_free(dup);
	if(len <= 0) return -1;
	int ok = EVP_Digest(der, (size_t)len, md, &mdlen, EVP_sha256(), NULL);
	OPENSSL_free(der);
	if(ok != 1) return -1;
	for(size_t i = 0; i < 32; i++) snprintf(kid + 2*i, 3, "%02x", md[i]);
	return 0;
}

static void free_keys(struct standin *s)
{
	for(size_t i = 0; i < s->nkeys; i++){
		free(s->keys[i].device);
		EVP_PKEY_free(s->keys[i].pkey);
	}
	free(s->keys);
	s->keys = NULL;
	s->nkeys = 0;
}

/* Reads a public key from a PEM file holding a PUBLIC KEY or a (self-signed) CERTIFICATE, as
 * akenza takes a device credential in either form. NULL if it holds neither. */
static EVP_PKEY *read_public_key(const char *path)
{
	FILE *f = fopen(path, "r");
	if(f == NULL) return NULL;
	EVP_PKEY *pkey = PEM_read_PUBKEY(f, NULL, NULL, NULL);
	if(pkey == NULL){
		rewind(f);
		X509 *x = PEM_read_X509(f, NULL, NULL, NULL);
		if(x) pkey = X509_get_pubkey(x);
		X509_free(x);
	}
	fclose(f);
	return pkey;
}

/* The device a key file belongs to, or NULL if the name is of neither form:
 * "<device>.pub.pem" (a key registered by hand) or "<device>~<credential>.cred.pem" (a credential
 * the REST stand-in, tests/akenza_rest_standin.py, created). Caller frees. */
static char *device_of_file(const char *name)
{
	size_t n = strlen(name);
	if(n > 9 && strcmp(name + n - 9, ".cred.pem") == 0){
		const char *tilde = strrchr(name, '~');
		return tilde && tilde > name ? strndup(name, (size_t)(tilde - name)) : NULL;
	}
	if(n > 8 && strcmp(name + n - 8, ".pub.pem") == 0) return strndup(name, n - 8);
	return NULL;
}

/* Reads keys_dir's key files again if the directory's mtime changed. (Two changes within one
 * tick of the kernel's clock leave one mtime: the REST stand-in moves the mtime on by hand then.) */
static void rescan_keys(struct standin *s, bool force)
{
	struct stat sb;
	if(stat(s->keys_dir, &sb) != 0) return;
	if(!force && sb.st_mtim.tv_sec == s->dir_mtime.tv_sec && sb.st_mtim.tv_nsec == s->dir_mtime.tv_nsec) return;
	s->dir_mtime = sb.st_mtim;
	DIR *d = opendir(s->keys_dir);
	if(d == NULL) return;
	free_keys(s);
	size_t cap = 0;
	struct dirent *e;
	while((e = readdir(d)) != NULL){
		char *device = device_of_file(e->d_name);
		if(device == NULL) continue;
		char path[4096];
		snprintf(path, sizeof(path), "%s/%s", s->keys_dir, e->d_name);
		EVP_PKEY *pkey = read_public_key(path);
		if(pkey == NULL){
			free(device);
			continue;
		}
		if(s->nkeys == cap){
			size_t ncap = cap ? cap * 2 : 64;
			struct regkey *nk = realloc(s->keys, ncap * sizeof(*nk));
			if(nk == NULL){
				EVP_PKEY_free(pkey);
				free(device);
				break;
			}
			s->keys = nk;
			cap = ncap;
		}
		struct regkey *k = &s->keys[s->nkeys];
		k->pkey = pkey;
		k->device = device;
		if(kid_of(pkey, k->kid)){
			free(k->device);
			EVP_PKEY_free(pkey);
			continue;
		}
		s->nkeys++;
	}
	closedir(d);
}

/* Credentials come and go at run time (a REST stand-in deletes them): look at the directory
 * before every lookup. */
static const struct regkey *find_kid(struct standin *s, const char *kid)
{
	rescan_keys(s, false);
	for(size_t i = 0; i < s->nkeys; i++){
		if(strcmp(s->keys[i].kid, kid) == 0) return &s->keys[i];
	}
	return NULL;
}

/* ---- JWT ---------------------------------------------------------------------------------- */

/* Decodes base64url without padding. Returns the length, or -1 if malformed. */
static int b64url_decode(const char *in, size_t len, unsigned char *out, size_t cap)
{
	size_t o = 0;
	uint32_t acc = 0;
	int bits = 0;
	for(size_t i = 0; i < len; i++){
		char c = in[i];
		int v = c >= 'A' && c <= 'Z' ? c - 'A' : c >= 'a' && c <= 'z' ? c - 'a' + 26
				: c >= '0' && c <= '9' ? c - '0' + 52 : c == '-' ? 62 : c == '_' ? 63 : -1;
		if(v < 0) return -1;
		acc = acc << 6 | (uint32_t)v;
		bits += 6;
		if(bits >= 8){
			bits -= 8;
			if(o >= cap) return -1;
			out[o++] = (unsigned char)(acc >> bits);
		}
	}
	if(bits >= 6) return -1;
	return (int)o;
}

static cJSON *decode_json_part(const char *part, size_t len)
{
	unsigned char buf[TOKEN_MAX];
	int n = b64url_decode(part, len, buf, sizeof(buf) - 1);
	if(n < 0) return NULL;
	buf[n] = '\0';
	return cJSON_ParseWithLength((const char *)buf, (size_t)n);
}

static bool verify_signature(const struct regkey *k, bool es256, const char *signed_part, size_t slen,
		const unsigned char *sig, int siglen)
{
	unsigned char der[128];
	const unsigned char *use = sig;
	size_t uselen = (size_t)siglen;
	if(es256){
		if(!EVP_PKEY_is_a(k->pkey, "EC") || siglen != 64) return false;
		ECDSA_SIG *es = ECDSA_SIG_new();
		BIGNUM *r = BN_bin2bn(sig, 32, NULL), *s = BN_bin2bn(sig + 32, 32, NULL);
		if(es == NULL || r == NULL || s == NULL || ECDSA_SIG_set0(es, r, s) != 1){
			BN_free(r);
			BN_free(s);
			ECDSA_SIG_free(es);
			return false;
		}
		unsigned char *p = der;
		int n = i2d_ECDSA_SIG(es, &p);
		ECDSA_SIG_free(es);
		if(n <= 0) return false;
		use = der;
		uselen = (size_t)n;
	}else if(!EVP_PKEY_is_a(k->pkey, "RSA")){
		return false;
	}
	EVP_MD_CTX *ctx = EVP_MD_CTX_new();
	bool ok = ctx && EVP_DigestVerifyInit(ctx, NULL, EVP_sha256(), NULL, k->pkey) == 1
			&& EVP_DigestVerify(ctx, use, uselen, (const unsigned char *)signed_part, slen) == 1;
	EVP_MD_CTX_free(ctx);
	return ok;
}

static bool get_int(const cJSON *o, const char *name, long long *out)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
	if(!cJSON_IsNumber(v) || v->valuedouble != (double)(long long)v->valuedouble) return false;
	*out = (long long)v->valuedouble;
	return true;
}

/* Checks a token for client `id` as akenza does. Returns NULL if good (and sets *exp,
 * *kid_out), else the reason. */
static const char *check_token(struct standin *s, const char *id, const char *tok, long long *exp,
		const struct regkey **kid_out)
{
	if(tok == NULL) return "no password (token)";
	size_t len = strlen(tok);
	if(len >= TOKEN_MAX) return "token too long";
	const char *d1 = strchr(tok, '.');
	const char *d2 = d1 ? strchr(d1 + 1, '.') : NULL;
	if(d1 == NULL || d2 == NULL || strchr(d2 + 1, '.')) return "not a JWT (three parts)";
	cJSON *hdr = decode_json_part(tok, (size_t)(d1 - tok));
	cJSON *claims = decode_json_part(d1 + 1, (size_t)(d2 - d1 - 1));
	const char *why = NULL;
	if(hdr == NULL || claims == NULL || !cJSON_IsObject(hdr) || !cJSON_IsObject(claims)){
		why = "malformed header or claims (base64url JSON objects)";
		goto out;
	}
	const cJSON *alg = cJSON_GetObjectItemCaseSensitive(hdr, "alg");
	const cJSON *typ = cJSON_GetObjectItemCaseSensitive(hdr, "typ");
	const cJSON *kid = cJSON_GetObjectItemCaseSensitive(hdr, "kid");
	if(!cJSON_IsString(alg) || (strcmp(alg->valuestring, "RS256") != 0 && strcmp(alg->valuestring, "ES256") != 0)){
		why = "alg must be RS256 or ES256";
		goto out;
	}
	if(typ && (!cJSON_IsString(typ) || strcmp(typ->valuestring, "JWT") != 0)){
		why = "typ is not JWT";
		goto out;
	}
	if(!cJSON_IsString(kid)){
		why = "no kid";
		goto out;
	}
	const struct regkey *k = find_kid(s, kid->valuestring);
	if(k == NULL){
		why = "unknown kid (public key not registered)";
		goto out;
	}
	unsigned char sig[1024];
	int siglen = b64url_decode(d2 + 1, strlen(d2 + 1), sig, sizeof(sig));
	if(siglen <= 0 || !verify_signature(k, alg->valuestring[0] == 'E', tok, (size_t)(d2 - tok), sig, siglen)){
		why = "bad signature";
		goto out;
	}
	if(strcmp(k->device, id) != 0){
		why = "kid belongs to another device than the client id";
		goto out;
	}
	const cJSON *aud = cJSON_GetObjectItemCaseSensitive(claims, "aud");
	char want[1024];
	snprintf(want, sizeof(want), "https://%s/devices/%s", s->audience ? s->audience : "akenza.io", id);
	if(!cJSON_IsString(aud) || strcmp(aud->valuestring, want) != 0){
		why = "aud mismatch";
		goto out;
	}
	long long iat, e, now = (long long)time(NULL);
	if(!get_int(claims, "exp", &e) || !get_int(claims, "iat", &iat)){
		why = "iat and exp must be integers";
		goto out;
	}
	if(e <= now){
		why = "token expired";
		goto out;
	}
	if(iat > now + s->max_skew){
		why = "iat in the future";
		goto out;
	}
	if(e - iat > s->max_lifetime){
		why = "lifetime too long";
		goto out;
	}
	*exp = e;
	*kid_out = k;
out:
	cJSON_Delete(hdr);
	cJSON_Delete(claims);
	return why;
}

/* ---- sessions ----------------------------------------------------------------------------- */

static void add_session(struct standin *s, const struct mosquitto *client, const char *id, long long exp)
{
	if(s->nsessions == s->cap){
		size_t ncap = s->cap ? s->cap * 2 : 64;
		struct session *n = realloc(s->sessions, ncap * sizeof(*n));
		if(n == NULL) return;
		s->sessions = n;
		s->cap = ncap;
	}
	char *copy = strdup(id);
	if(copy == NULL) return;
	s->sessions[s->nsessions++] = (struct session){.client = client, .id = copy, .exp = exp};
}

static void drop_session(struct standin *s, size_t i)
{
	free(s->sessions[i].id);
	s->sessions[i] = s->sessions[--s->nsessions];
	s->sessions[s->nsessions] = (struct session){0};   /* no stale copy left behind */
}

static struct session *session_of(struct standin *s, const struct mosquitto *client)
{
	for(size_t i = 0; i < s->nsessions; i++) if(s->sessions[i].client == client) return &s->sessions[i];
	return NULL;
}

/* ---- callbacks ---------------------------------------------------------------------------- */

static int on_auth(int event, void *data, void *user)
{
	struct standin *s = user;
	struct mosquitto_evt_basic_auth *ev = data;
	const char *id = mosquitto_client_id(ev->client);
	(void)event;

	if(ev->username && strcmp(ev->username, "observer") == 0){
		if(s->observer_password && ev->password && strcmp(ev->password, s->observer_password) == 0){
			return MOSQ_ERR_SUCCESS;
		}
		refuse_log(id, "bad observer password");
		return MOSQ_ERR_AUTH;
	}
	long long exp = 0;
	const struct regkey *k = NULL;
	const char *why = check_token(s, id ? id : "", ev->password, &exp, &k);
	if(why){
		refuse_log(id, why);
		return MOSQ_ERR_AUTH;
	}
	add_session(s, ev->client, id ? id : "", exp);
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "standin: accepted client '%s' kid %s alg %s exp %lld",
			id, k->kid, EVP_PKEY_is_a(k->pkey, "EC") ? "ES256" : "RS256", exp);
	return MOSQ_ERR_SUCCESS;
}

static int on_acl(int event, void *data, void *user)
{
	struct standin *s = user;
	struct mosquitto_evt_acl_check *ev = data;
	const char *username = mosquitto_client_username(ev->client);
	(void)event;

	if(ev->access == MOSQ_ACL_UNSUBSCRIBE) return MOSQ_ERR_SUCCESS;
	if(username && strcmp(username, "observer") == 0 && session_of(s, ev->client) == NULL){
		if(ev->access == MOSQ_ACL_WRITE) return akz_topic_device(ev->topic, AKZ_TOPIC_DOWN, &(size_t){0})
				? MOSQ_ERR_SUCCESS : MOSQ_ERR_ACL_DENIED;
		return MOSQ_ERR_SUCCESS;
	}
	struct session *ss = session_of(s, ev->client);
	if(ss == NULL) return MOSQ_ERR_ACL_DENIED;
	bool ok = ev->access == MOSQ_ACL_WRITE ? akz_topic_is_for(ev->topic, AKZ_TOPIC_UP, ss->id)
			: akz_topic_is_for(ev->topic, AKZ_TOPIC_DOWN, ss->id);
	if(!ok && ev->access != MOSQ_ACL_READ){
		mosquitto_log_printf(MOSQ_LOG_NOTICE, "standin: denied '%s' on '%s'", ss->id, ev->topic);
	}
	return ok ? MOSQ_ERR_SUCCESS : MOSQ_ERR_ACL_DENIED;
}

static int on_tick(int event, void *data, void *user)
{
	struct standin *s = user;
	long long now = (long long)time(NULL);
	(void)event;
	(void)data;
	for(size_t i = 0; i < s->nsessions;){
		if(s->sessions[i].exp <= now){
			/* Forget the session before the kick: the kick runs the DISCONNECT callback,
			 * which would otherwise drop (and free) the same session a second time. */
			char *id = s->sessions[i].id;
			s->sessions[i] = s->sessions[--s->nsessions];
			s->sessions[s->nsessions] = (struct session){0};   /* no stale copy left behind */
			mosquitto_log_printf(MOSQ_LOG_NOTICE, "standin: token of '%s' expired: disconnecting", id);
			mosquitto_kick_client_by_clientid(id, false);
			free(id);
		}else{
			i++;
		}
	}
	return MOSQ_ERR_SUCCESS;
}

static int on_disconnect(int event, void *data, void *user)
{
	struct standin *s = user;
	struct mosquitto_evt_disconnect *ev = data;
	(void)event;
	for(size_t i = 0; i < s->nsessions; i++){
		if(s->sessions[i].client == ev->client){
			drop_session(s, i);
			break;
		}
	}
	return MOSQ_ERR_SUCCESS;
}

/* Records an accepted uplink as "<topic> <payload in hex>" before the broker acknowledges it:
 * what akenza got, across restarts, without a subscriber that could come too late. */
static int on_message(int event, void *data, void *user)
{
	struct standin *s = user;
	struct mosquitto_evt_message *ev = data;
	(void)event;
	if(s->record == NULL || strncmp(ev->topic, "/up/", 4) != 0) return MOSQ_ERR_SUCCESS;
	fprintf(s->record, "%s ", ev->topic);
	for(uint32_t i = 0; i < ev->payloadlen; i++) fprintf(s->record, "%02x", ((const unsigned char *)ev->payload)[i]);
	fputc('\n', s->record);
	fflush(s->record);
	return MOSQ_ERR_SUCCESS;
}

static int on_reload(int event, void *data, void *user)
{
	(void)event;
	(void)data;
	rescan_keys(user, true);
	return MOSQ_ERR_SUCCESS;
}

EXPORT int mosquitto_plugin_version(int n, const int *versions)
{
	for(int i = 0; i < n; i++) if(versions[i] == 5) return 5;
	return -1;
}

EXPORT int mosquitto_plugin_init(mosquitto_plugin_id_t *pid, void **user, struct mosquitto_opt *opts, int n)
{
	struct standin *s = calloc(1, sizeof(*s));
	if(s == NULL) return MOSQ_ERR_NOMEM;
	s->pid = pid;
	s->max_skew = 60;
	s->max_lifetime = 86400;
	for(int i = 0; i < n; i++){
		if(!strcmp(opts[i].key, "keys_dir")) s->keys_dir = strdup(opts[i].value);
		else if(!strcmp(opts[i].key, "observer_password")) s->observer_password = strdup(opts[i].value);
		else if(!strcmp(opts[i].key, "audience") && s->audience == NULL) s->audience = strdup(opts[i].value);
		else if(!strcmp(opts[i].key, "max_skew")) s->max_skew = atol(opts[i].value);
		else if(!strcmp(opts[i].key, "max_lifetime")) s->max_lifetime = atol(opts[i].value);
		else if(!strcmp(opts[i].key, "record_file") && s->record == NULL) s->record = fopen(opts[i].value, "a");
	}
	if(s->keys_dir == NULL){
		mosquitto_log_printf(MOSQ_LOG_ERR, "standin: plugin_opt_keys_dir is required");
		free(s->observer_password);
		free(s->audience);
		free(s);
		return MOSQ_ERR_INVAL;
	}
	rescan_keys(s, true);
	mosquitto_callback_register(pid, MOSQ_EVT_BASIC_AUTH, on_auth, NULL, s);
	mosquitto_callback_register(pid, MOSQ_EVT_ACL_CHECK, on_acl, NULL, s);
	mosquitto_callback_register(pid, MOSQ_EVT_TICK, on_tick, NULL, s);
	mosquitto_callback_register(pid, MOSQ_EVT_DISCONNECT, on_disconnect, NULL, s);
	mosquitto_callback_register(pid, MOSQ_EVT_RELOAD, on_reload, NULL, s);
	if(s->record) mosquitto_callback_register(pid, MOSQ_EVT_MESSAGE, on_message, NULL, s);
	*user = s;
	return MOSQ_ERR_SUCCESS;
}

EXPORT int mosquitto_plugin_cleanup(void *user, struct mosquitto_opt *opts, int n)
{
	struct standin *s = user;
	(void)opts;
	(void)n;
	mosquitto_callback_unregister(s->pid, MOSQ_EVT_BASIC_AUTH, on_auth, NULL);
	mosquitto_callback_unregister(s->pid, MOSQ_EVT_ACL_CHECK, on_acl, NULL);
	mosquitto_callback_unregister(s->pid, MOSQ_EVT_TICK, on_tick, NULL);
	mosquitto_callback_unregister(s->pid, MOSQ_EVT_DISCONNECT, on_disconnect, NULL);
	mosquitto_callback_unregister(s->pid, MOSQ_EVT_RELOAD, on_reload, NULL);
	if(s->record){
		mosquitto_callback_unregister(s->pid, MOSQ_EVT_MESSAGE, on_message, NULL);
		fclose(s->record);
	}
	free_keys(s);
	while(s->nsessions) drop_session(s, 0);
	free(s->sessions);
	free(s->keys_dir);
	free(s->observer_password);
	free(s->audience);
	free(s);
	return MOSQ_ERR_SUCCESS;
}
