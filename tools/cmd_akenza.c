/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* cmd_akenza.c - akenzactl akenza register|prune|import: a fleet's keys onto akenza's REST API. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <cJSON.h>
#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include "akenza_api.h"
#include "akenzactl.h"
#include "akz_regfile.h"
#include "akz_registry.h"
#include "akz_x509.h"
#include "fleet.h"

#define API_KEY_MAX 1024

const char ctl_api_help[] =
	"akenza's REST API:\n"
	"            --api-url URL (https://api.akenza.io; a private cloud's API otherwise)\n"
	"            --api-key-file FILE (first line; mode 0600) or the AKENZA_API_KEY variable: never an argument\n"
	"            --api-cafile FILE (CA of the API's certificate; default: the system store; always verified)\n"
	"            --max-retries N (of one request after a 429, a 5xx or a broken connection; default 8)\n"
	"            https_proxy / no_proxy are honoured.\n";

int ctl_api_option(int c, const char *arg, struct ctl_api_args *a)
{
	switch(c){
	case CTL_OPT_API_URL: a->url = arg; return 1;
	case CTL_OPT_API_KEY_FILE: a->key_file = arg; return 1;
	case CTL_OPT_API_CAFILE: a->cafile = arg; return 1;
	case CTL_OPT_API_KEY:
		/* Its value is not repeated: it may be the key. */
		ctl_error("the API key is never an argument (ps and shell histories show those): give --api-key-file "
				"FILE or set " AKZ_API_KEY_ENV);
		return -1;
	case CTL_OPT_API_RETRIES: {
		char *end;
		errno = 0;
		long v = strtol(arg, &end, 10);
		if(errno || end == arg || *end || v < 0 || v > 100){
			ctl_error("--max-retries: '%s' is not a number from 0 to 100", arg);
			return -1;
		}
		a->max_retries = (int)v;
		return 1;
	}
	default: return 0;
	}
}

/* Reads the API key into buf: the first line of a->key_file, which only its owner may read, or
 * $AKENZA_API_KEY. Returns 0, or -1 after printing why (the key itself is never printed). */
static int read_api_key(const struct ctl_api_args *a, char *buf, size_t size)
{
	if(a->key_file == NULL){
		const char *env = getenv(AKZ_API_KEY_ENV);
		if(env == NULL || env[0] == '\0'){
			ctl_error("no API key: give --api-key-file FILE or set " AKZ_API_KEY_ENV " (never on the command line)");
			return -1;
		}
		if(strlen(env) >= size){
			ctl_error(AKZ_API_KEY_ENV ": longer than %zu bytes", size - 1);
			return -1;
		}
		snprintf(buf, size, "%s", env);
		return 0;
	}
	int fd = open(a->key_file, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	struct stat sb;
	if(fd < 0 || fstat(fd, &sb) != 0){
		ctl_error("--api-key-file %s: %s", a->key_file, strerror(errno));
		if(fd >= 0) close(fd);
		return -1;
	}
	if(!S_ISREG(sb.st_mode) || (sb.st_mode & (S_IRWXG | S_IRWXO))){
		ctl_error("--api-key-file %s: mode %04o: %s", a->key_file, (unsigned)(sb.st_mode & 07777),
				S_ISREG(sb.st_mode) ? "group or others can read it: chmod 600 it (the API key is a secret)"
				: "not a regular file");
		close(fd);
		return -1;
	}
	ssize_t n = read(fd, buf, size - 1);
	close(fd);
	if(n <= 0){
		ctl_error("--api-key-file %s: %s", a->key_file, n < 0 ? strerror(errno) : "empty");
		return -1;
	}
	buf[n] = '\0';
	buf[strcspn(buf, "\r\n")] = '\0';
	return 0;
}

/* Opens the API the arguments describe. Returns 0 and *out, or 1 after printing why. */
static int open_api(const struct ctl_api_args *a, struct akz_api **out)
{
	char key[API_KEY_MAX + 2], err[512];
	if(read_api_key(a, key, sizeof(key))) return 1;
	struct akz_api_opts o = {.url = a->url, .cafile = a->cafile,
		.max_retries = a->max_retries >= 0 ? a->max_retries : AKZ_API_RETRIES_DEFAULT};
	int rc = akz_api_open(&o, key, out, err, sizeof(err));
	OPENSSL_cleanse(key, sizeof(key));
	if(rc){
		ctl_error("%s", err);
		return 1;
	}
	return 0;
}

/* ---- the fleet ---------------------------------------------------------------------------------- */

struct fleet_dev *fleet_add(struct fleet *f, const char *id)
{
	if(f->n == f->cap){
		size_t cap = f->cap ? f->cap * 2 : 64;
		struct fleet_dev *d = realloc(f->devs, cap * sizeof(*d));
		if(d == NULL) return NULL;
		f->devs = d;
		f->cap = cap;
	}
	struct fleet_dev *d = &f->devs[f->n];
	memset(d, 0, sizeof(*d));
	if((d->id = strdup(id)) == NULL) return NULL;
	f->n++;
	return d;
}

/* Records why d cannot be registered (the first reason counts). */
static void set_problem(struct fleet_dev *d, const char *why)
{
	if(d->problem == NULL) d->problem = strdup(why);
}

static void free_key(struct fleet_key *k)
{
	EVP_PKEY_free(k->pub);
	free(k->pem);
	free(k->cert);
	memset(k, 0, sizeof(*k));
}

void fleet_free(struct fleet *f)
{
	for(size_t i = 0; i < f->n; i++){
		free(f->devs[i].id);
		free(f->devs[i].problem);
		free_key(&f->devs[i].keys[0]);
		free_key(&f->devs[i].keys[1]);
	}
	free(f->devs);
	memset(f, 0, sizeof(*f));
}

/* A public key from PEM text holding a PUBLIC KEY or a CERTIFICATE. Text that carries its line
 * breaks as the two characters '\' 'n' (as in akenza's Java client's test data) is read too.
 * Returns a new key, or NULL. */
static EVP_PKEY *pem_public_key(const char *text)
{
	char *copy = strdup(text);
	if(copy == NULL) return NULL;
	char *w = copy;
	for(const char *r = text; *r; r++){
		if(r[0] == '\\' && r[1] == 'n'){
			*w++ = '\n';
			r++;
		}else{
			*w++ = *r;
		}
	}
	*w = '\0';
	EVP_PKEY *pkey = NULL;
	BIO *bio = BIO_new_mem_buf(copy, -1);
	if(bio && strstr(copy, "-----BEGIN CERTIFICATE-----")){
		X509 *x = PEM_read_bio_X509(bio, NULL, NULL, NULL);
		if(x) pkey = X509_get_pubkey(x);
		X509_free(x);
	}else if(bio){
		pkey = PEM_read_bio_PUBKEY(bio, NULL, NULL, NULL);
	}
	BIO_free(bio);
	free(copy);
	return pkey;
}

int fleet_set_pem(struct fleet_dev *d, int k, const char *pem, const char *cert_pem, char *err, size_t errlen)
{
	struct fleet_key *key = &d->keys[k];
	free_key(key);
	key->pub = pem_public_key(pem);
	if(key->pub == NULL){
		snprintf(err, errlen, "device '%s': not a PEM public key", d->id);
		return -1;
	}
	key->alg = EVP_PKEY_is_a(key->pub, "EC") ? AKZ_ALG_ES256 : AKZ_ALG_RS256;
	if(akz_pkey_kid(key->pub, key->kid, err, errlen)) return -1;
	key->pem = strdup(pem);
	key->cert = cert_pem ? strdup(cert_pem) : NULL;
	if(key->pem == NULL || (cert_pem && key->cert == NULL)){
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	return 0;
}

/* Loads the key at uri into slot k of d, with a certificate made from it when o->cert.
 * A failure becomes d's problem. */
static void load_key(struct fleet_dev *d, int k, const char *uri, const struct akz_key_opts *ko, const struct fleet_opts *o)
{
	struct akz_key *key = NULL;
	char err[512], why[700];
	char *pem = NULL, *cert = NULL;
	if(akz_key_load(uri, ko, &key, err, sizeof(err))){
		snprintf(why, sizeof(why), "%s key: %s", k ? "pending" : "current", err);
		set_problem(d, why);
		return;
	}
	pem = akz_key_public_pem(key);
	if(o->cert) cert = akz_x509_self_signed(key, d->id, o->days, err, sizeof(err));
	if(pem == NULL || (o->cert && cert == NULL)){
		snprintf(why, sizeof(why), "%s", pem == NULL ? "out of memory" : err);
		set_problem(d, why);
	}else if(fleet_set_pem(d, k, pem, cert, err, sizeof(err))){
		set_problem(d, err);
	}
	free(pem);
	free(cert);
	akz_key_unref(key);
}

/* Fills d's keys from its registry entry e: "key" (default: the key store's <id>.pem) and
 * "next_key". */
static void load_entry(struct fleet_dev *d, const cJSON *e, const char *path, const char *keystore,
		const struct akz_key_opts *ko, const struct fleet_opts *o)
{
	static const char *const fields[2] = {"key", "next_key"};
	for(int k = 0; k < 2; k++){
		const cJSON *v = cJSON_GetObjectItemCaseSensitive(e, fields[k]);
		if(v && !cJSON_IsString(v)){
			set_problem(d, k ? "\"next_key\" is not a string" : "\"key\" is not a string");
			return;
		}
		if(v == NULL && k == 1) continue;
		char *uri = v ? akz_registry_resolve_key(path, v->valuestring) : akz_registry_keystore_path(path, keystore, d->id, ".pem");
		if(uri == NULL){
			set_problem(d, "key path too long or out of memory");
			return;
		}
		load_key(d, k, uri, ko, o);
		free(uri);
	}
}

int fleet_from_registry(struct fleet *f, const char *path, const char *keystore, const struct akz_key_opts *ko,
		char **ids, size_t nids, bool all, const struct fleet_opts *o)
{
	char err[1024];
	cJSON *root = akz_regfile_read(path, err, sizeof(err));
	const cJSON *devs = root ? cJSON_GetObjectItemCaseSensitive(root, "devices") : NULL;
	if(root && !cJSON_IsArray(devs)){
		snprintf(err, sizeof(err), "%s: no \"devices\" list", path);
	}
	if(root == NULL || !cJSON_IsArray(devs)){
		ctl_error("%s", err);
		cJSON_Delete(root);
		return -1;
	}
	size_t want = all ? (size_t)cJSON_GetArraySize(devs) : nids;
	for(size_t i = 0; i < want; i++){
		const cJSON *e = NULL;
		const char *id = NULL;
		if(all){
			e = cJSON_GetArrayItem(devs, (int)i);
			const cJSON *v = cJSON_GetObjectItemCaseSensitive(e, "id");
			id = cJSON_IsString(v) ? v->valuestring : NULL;
			if(id == NULL){
				ctl_error("%s: devices[%zu]: no \"id\": skipped", path, i);
				continue;
			}
		}else{
			id = ids[i];
			for(const cJSON *c = devs->child; c && e == NULL; c = c->next){
				const cJSON *v = cJSON_GetObjectItemCaseSensitive(c, "id");
				if(cJSON_IsString(v) && strcmp(v->valuestring, id) == 0) e = c;
			}
		}
		struct fleet_dev *d = fleet_add(f, id);
		if(d == NULL){
			ctl_error("out of memory");
			cJSON_Delete(root);
			return -1;
		}
		const char *bad = akz_registry_bad_id_reason(id);
		if(bad){
			snprintf(err, sizeof(err), "device id %s", bad);
			set_problem(d, err);
		}else if(e == NULL){
			snprintf(err, sizeof(err), "not in the registry %s", path);
			set_problem(d, err);
		}else{
			load_entry(d, e, path, keystore, ko, o);
		}
	}
	cJSON_Delete(root);
	return 0;
}

/* ---- one device --------------------------------------------------------------------------------- */

/* What happened to one device. */
struct outcome {
	bool failed;
	bool created;            /* the device was (or, dry, would be) created in akenza */
	int uploaded;            /* keys uploaded (or that would be) */
	int present;             /* keys akenza held already */
	int deleted;             /* prune: credentials deleted (or that would be) */
	int kept;                /* prune: credentials kept */
	char akenza_id[64];
	char text[1024];         /* what to print after "<id>: " */
};

static void failf(struct outcome *out, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void failf(struct outcome *out, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(out->text, sizeof(out->text), fmt, ap);
	va_end(ap);
	out->failed = true;
}

/* Looks d up in akenza (creating it when asked). Returns the device (caller frees), or NULL with
 * out failed, or NULL with out->created in a dry run that would create it. */
static cJSON *find_or_create(struct akz_api *api, const struct fleet_opts *o, const char *id, struct outcome *out)
{
	char err[1024];
	cJSON *dev = NULL;
	int rc = akz_api_find_device(api, id, &dev, err, sizeof(err));
	if(rc < 0){
		failf(out, "%s", err);
		return NULL;
	}
	if(rc == AKZ_API_ABSENT && !o->create){
		failf(out, "akenza has no device with this deviceId: create it there, or give --create --workspace W "
				"--data-flow D");
		return NULL;
	}
	if(rc == AKZ_API_ABSENT){
		out->created = true;
		if(o->dry_run) return NULL;
		if(akz_api_create_device(api, id, o->workspace, o->data_flow, &dev, err, sizeof(err))){
			/* A POST retried after a lost answer may have made it after all. */
			char again[256];
			if(akz_api_find_device(api, id, &dev, again, sizeof(again)) != 0){
				failf(out, "creating it: %s", err);
				return NULL;
			}
		}
	}
	snprintf(out->akenza_id, sizeof(out->akenza_id), "%s", cJSON_GetObjectItemCaseSensitive(dev, "id")->valuestring);
	return dev;
}

/* True if credential c (an element of akenza's list) holds the public key pub. */
static bool credential_holds(const cJSON *c, const EVP_PKEY *pub)
{
	const cJSON *pk = cJSON_GetObjectItemCaseSensitive(c, "publicKey");
	EVP_PKEY *theirs = cJSON_IsString(pk) ? pem_public_key(pk->valuestring) : NULL;
	bool same = theirs && EVP_PKEY_eq(theirs, pub) == 1;
	EVP_PKEY_free(theirs);
	return same;
}

static bool list_holds(const cJSON *creds, const EVP_PKEY *pub)
{
	for(const cJSON *c = creds ? creds->child : NULL; c; c = c->next){
		if(credential_holds(c, pub)) return true;
	}
	return false;
}

static const char *algorithm_of(const struct fleet_key *k)
{
	if(k->alg == AKZ_ALG_ES256) return k->cert ? "EC256_X509_PEM" : "EC256_PEM";
	return k->cert ? "RSA256_X509_PEM" : "RSA256_PEM";
}

/* Appends to out->text. */
static void add_text(struct outcome *out, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void add_text(struct outcome *out, const char *fmt, ...)
{
	size_t n = strlen(out->text);
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(out->text + n, sizeof(out->text) - n, fmt, ap);
	va_end(ap);
}

/* register: the device in akenza, and each of its keys akenza does not hold. */
static void register_device(struct akz_api *api, const struct fleet_opts *o, struct fleet_dev *d, struct outcome *out)
{
	if(d->problem){
		failf(out, "%s", d->problem);
		return;
	}
	cJSON *dev = find_or_create(api, o, d->id, out), *creds = NULL;
	if(out->failed) return;
	char err[1024];
	/* A device made just now holds no credentials: no need to ask. */
	if(dev && !out->created && akz_api_list_credentials(api, out->akenza_id, &creds, err, sizeof(err))){
		failf(out, "%s", err);
		cJSON_Delete(dev);
		return;
	}
	const char *verb = o->dry_run ? "would upload" : "uploaded";
	out->text[0] = '\0';
	if(out->created) add_text(out, "%s in akenza; ", o->dry_run ? "would be created" : "created");
	for(int k = 0; k < 2; k++){
		const struct fleet_key *key = &d->keys[k];
		if(key->pub == NULL) continue;
		const char *which = k ? "pending" : "current";
		if(list_holds(creds, key->pub)){
			out->present++;
			add_text(out, "%s key already registered (kid %.16s); ", which, key->kid);
			continue;
		}
		if(!o->dry_run){
			char name[96];
			snprintf(name, sizeof(name), "mosquitto-akenza %.16s", key->kid);
			cJSON *cred = NULL;
			if(akz_api_create_credential(api, out->akenza_id, name, algorithm_of(key), key->cert ? key->cert : key->pem,
					&cred, err, sizeof(err))){
				failf(out, "uploading the %s key: %s", which, err);
				break;
			}
			cJSON_Delete(cred);
		}
		out->uploaded++;
		add_text(out, "%s %s key as %s (kid %.16s); ", verb, which, algorithm_of(key), key->kid);
	}
	size_t n = strlen(out->text);
	if(!out->failed && n >= 2) out->text[n - 2] = '\0';
	cJSON_Delete(creds);
	cJSON_Delete(dev);
}

/* prune: every credential whose key is neither the current nor the pending one. */
static void prune_device(struct akz_api *api, const struct fleet_opts *o, struct fleet_dev *d, struct outcome *out)
{
	if(d->problem){
		failf(out, "%s", d->problem);
		return;
	}
	char err[1024];
	cJSON *dev = NULL, *creds = NULL;
	int rc = akz_api_find_device(api, d->id, &dev, err, sizeof(err));
	if(rc){
		failf(out, "%s", rc == AKZ_API_ABSENT ? "akenza has no device with this deviceId" : err);
		return;
	}
	snprintf(out->akenza_id, sizeof(out->akenza_id), "%s", cJSON_GetObjectItemCaseSensitive(dev, "id")->valuestring);
	cJSON_Delete(dev);
	if(akz_api_list_credentials(api, out->akenza_id, &creds, err, sizeof(err))){
		failf(out, "%s", err);
		return;
	}
	/* Without its current key in akenza the device would be left with nothing that works. */
	if(!list_holds(creds, d->keys[0].pub)){
		failf(out, "its current key (kid %.16s) is not registered in akenza: nothing deleted (run register first)",
				d->keys[0].kid);
		cJSON_Delete(creds);
		return;
	}
	int unreadable = 0;
	for(const cJSON *c = creds->child; c && !out->failed; c = c->next){
		const cJSON *pk = cJSON_GetObjectItemCaseSensitive(c, "publicKey");
		const cJSON *cid = cJSON_GetObjectItemCaseSensitive(c, "id");
		EVP_PKEY *theirs = cJSON_IsString(pk) ? pem_public_key(pk->valuestring) : NULL;
		bool ours = theirs && (EVP_PKEY_eq(theirs, d->keys[0].pub) == 1
				|| (d->keys[1].pub && EVP_PKEY_eq(theirs, d->keys[1].pub) == 1));
		EVP_PKEY_free(theirs);
		if(theirs == NULL || !cJSON_IsString(cid)){
			unreadable++;   /* not ours to judge */
		}else if(ours){
			out->kept++;
		}else if(o->dry_run || akz_api_delete_credential(api, out->akenza_id, cid->valuestring, err, sizeof(err)) == 0){
			out->deleted++;
		}else{
			failf(out, "deleting credential %s: %s", cid->valuestring, err);
		}
	}
	if(!out->failed){
		snprintf(out->text, sizeof(out->text), "%s %d old credential%s, kept %d (current%s)%s", o->dry_run ?
				"would delete" : "deleted", out->deleted, out->deleted == 1 ? "" : "s", out->kept,
				d->keys[1].pub ? " and pending" : "", unreadable ? "; kept too: some akenza lists with a key "
				"that could not be read" : "");
	}
	cJSON_Delete(creds);
}

/* ---- reporting ---------------------------------------------------------------------------------- */

struct report {
	bool bar, json, prune;
	size_t total, done, failed, changed, created, uploaded, present, deleted;
	double t0;
	cJSON *devices;          /* with json */
};

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void draw_bar(const struct report *r)
{
	enum { WIDTH = 30 };
	size_t fill = r->total ? r->done * WIDTH / r->total : WIDTH;
	double t = now_s() - r->t0;
	printf("\r[%.*s%*s] %zu/%zu devices, %zu failed, %.1f/s ", (int)fill, "##############################",
			(int)(WIDTH - fill), "", r->done, r->total, r->failed, t > 0 ? (double)r->done / t : 0.0);
	fflush(stdout);
}

static void report_device(struct report *r, const struct fleet_dev *d, const struct outcome *out)
{
	r->done++;
	if(out->failed) r->failed++;
	else if(out->uploaded || out->created || out->deleted) r->changed++;
	r->created += out->created;
	r->uploaded += (size_t)out->uploaded;
	r->present += (size_t)out->present;
	r->deleted += (size_t)out->deleted;
	if(r->json){
		cJSON *o = cJSON_CreateObject();
		if(o){
			cJSON_AddStringToObject(o, "id", d->id);
			if(out->akenza_id[0]) cJSON_AddStringToObject(o, "akenza_id", out->akenza_id);
			cJSON_AddStringToObject(o, "result", out->failed ? "failed" : "ok");
			if(r->prune){
				cJSON_AddNumberToObject(o, "deleted", out->deleted);
				cJSON_AddNumberToObject(o, "kept", out->kept);
			}else{
				cJSON_AddBoolToObject(o, "created", out->created);
				cJSON_AddNumberToObject(o, "uploaded", out->uploaded);
				cJSON_AddNumberToObject(o, "already_registered", out->present);
			}
			cJSON_AddStringToObject(o, "message", out->text);
			cJSON_AddItemToArray(r->devices, o);
		}
		return;
	}
	if(r->bar){
		/* Failures stay on the screen above the bar; the rest only move it. */
		if(out->failed) printf("\r\033[K%s: FAILED: %s\n", d->id, out->text);
		draw_bar(r);
		return;
	}
	printf("%s: %s%s\n", d->id, out->failed ? "FAILED: " : "", out->text);
	fflush(stdout);
}

/* Prints the summary; with json, the whole document (r->devices is used up). */
static void report_summary(struct report *r, const struct akz_api_stats *st, bool dry)
{
	double t = now_s() - r->t0;
	if(r->json){
		cJSON *doc = cJSON_CreateObject(), *s = doc ? cJSON_AddObjectToObject(doc, "summary") : NULL;
		if(s == NULL || !cJSON_AddItemToObject(doc, "devices", r->devices)) cJSON_Delete(r->devices);
		r->devices = NULL;
		if(s){
			cJSON_AddNumberToObject(s, "devices", (double)r->total);
			cJSON_AddNumberToObject(s, "failed", (double)r->failed);
			cJSON_AddNumberToObject(s, "changed", (double)r->changed);
			cJSON_AddNumberToObject(s, r->prune ? "deleted" : "uploaded", (double)(r->prune ? r->deleted : r->uploaded));
			if(!r->prune) cJSON_AddNumberToObject(s, "created", (double)r->created);
			cJSON_AddNumberToObject(s, "requests", (double)st->requests);
			cJSON_AddNumberToObject(s, "retries", (double)st->retries);
			cJSON_AddNumberToObject(s, "throttled", (double)st->throttled);
			cJSON_AddNumberToObject(s, "server_errors", (double)st->server_errors);
			cJSON_AddNumberToObject(s, "waited_s", st->waited_s);
			cJSON_AddNumberToObject(s, "seconds", t);
			cJSON_AddBoolToObject(s, "dry_run", dry);
			char *text = cJSON_PrintUnformatted(doc);
			if(text) printf("%s\n", text);
			else ctl_error("out of memory");
			free(text);
		}
		cJSON_Delete(doc);
		return;
	}
	if(r->bar) printf("\r\033[K");
	printf("%s%zu devices: %zu %s, %zu unchanged, %zu failed", dry ? "dry run: " : "", r->total, r->changed,
			r->prune ? "pruned" : "registered", r->total - r->changed - r->failed, r->failed);
	if(r->prune) printf("; %zu credentials %s", r->deleted, dry ? "to delete" : "deleted");
	else printf("; %zu keys %s, %zu already there, %zu devices %s", r->uploaded, dry ? "to upload" : "uploaded",
			r->present, r->created, dry ? "to create" : "created");
	printf("; %ld requests (%.1f per device), %ld retries (%ld throttled, %ld server errors), waited %.1f s; "
			"%.1f s, %.1f devices/s\n", st->requests, r->total ? (double)st->requests / (double)r->total : 0.0,
			st->retries, st->throttled, st->server_errors, st->waited_s, t, t > 0 ? (double)r->total / t : 0.0);
}

/* Runs one per-device step over the fleet and reports. Returns the exit status. */
static int run_fleet(const struct ctl_api_args *a, const struct fleet_opts *o, struct fleet *f, bool prune)
{
	struct akz_api *api;
	if(open_api(a, &api)) return 1;
	struct report r = {.json = o->json, .prune = prune, .total = f->n, .t0 = now_s()};
	r.bar = !o->json && isatty(STDOUT_FILENO);
	if(o->json && (r.devices = cJSON_CreateArray()) == NULL){
		ctl_error("out of memory");
		akz_api_close(api);
		return 1;
	}
	if(r.bar) draw_bar(&r);
	for(size_t i = 0; i < f->n; i++){
		struct outcome out = {0};
		/* Once the API is unreachable or refuses the key, every device would fail alike. */
		const char *dead = akz_api_dead(api);
		if(dead) failf(&out, "not tried: %s", dead);
		else if(prune) prune_device(api, o, &f->devs[i], &out);
		else register_device(api, o, &f->devs[i], &out);
		report_device(&r, &f->devs[i], &out);
	}
	report_summary(&r, akz_api_stats(api), o->dry_run);
	akz_api_close(api);
	return r.failed ? 1 : 0;
}

int fleet_register(const struct ctl_api_args *a, const struct fleet_opts *o, struct fleet *f)
{
	return run_fleet(a, o, f, false);
}

int ctl_akenza_register_key(const struct ctl_api_args *a, const char *id, const char *pem, const char *cert)
{
	struct fleet f = {0};
	struct fleet_opts o = {.cert = cert != NULL};
	char err[512];
	struct fleet_dev *d = fleet_add(&f, id);
	int rc = 1;
	if(d == NULL){
		ctl_error("out of memory");
	}else if(fleet_set_pem(d, 1, pem, cert, err, sizeof(err))){
		ctl_error("%s", err);
	}else{
		rc = run_fleet(a, &o, &f, false);
	}
	fleet_free(&f);
	return rc;
}

/* ---- the commands ------------------------------------------------------------------------------- */

enum { O_REGISTRY = 1200, O_KEYSTORE, O_ALL, O_CREATE, O_WORKSPACE, O_DATA_FLOW, O_CERT, O_DAYS, O_DRY_RUN,
	O_JSON, O_HELP };

static const char register_help[] =
	"usage: akenzactl akenza register (ID... | --all) --registry FILE [--keystore DIR]\n"
	"                 [--create --workspace W --data-flow D] [--cert [--days N]] [--dry-run] [--json]\n"
	"                 [API options] [--passphrase-file F] [--allow-readable]\n"
	"Registers the devices of the registry FILE (IDs, or --all) with akenza: looks each up by its\n"
	"deviceId, creates it with --create (an MQTT device of data flow D in workspace W: its MQTT\n"
	"connector must use device credentials), and uploads its key, and a pending next_key, unless\n"
	"akenza holds the same public key already: as a public key (EC256_PEM, RSA256_PEM) or, with\n"
	"--cert, as a self-signed certificate made from the key (EC256_X509_PEM, RSA256_X509_PEM; valid\n"
	"N days, default 3650). --dry-run asks akenza but changes nothing. A device that fails does not\n"
	"stop the others; the exit status is 0 only if every device succeeded. It reads the private keys:\n"
	"run it as the broker's user (or root).\n";

static const char prune_help[] =
	"usage: akenzactl akenza prune (ID... | --all) --registry FILE [--keystore DIR] [--dry-run] [--json]\n"
	"                 [API options] [--passphrase-file F] [--allow-readable]\n"
	"Deletes the credentials akenza holds for a device whose key is neither the device's current key\n"
	"nor its pending one (after commit-key, the old key's). A device whose current key akenza does\n"
	"not hold is left alone (it fails): run register first.\n";

static const char group_help[] =
	"usage: akenzactl akenza COMMAND ...   (akenzactl akenza COMMAND --help)\n\n"
	"  akenzactl akenza register (ID... | --all) --registry FILE   upload device keys to akenza\n"
	"  akenzactl akenza prune (ID... | --all) --registry FILE      delete keys no longer in use\n"
	"  akenzactl akenza import FILE.csv (--registry FILE | --broker) [--register]\n"
	"                                                              create a fleet from a CSV file\n\n";

/* register and prune: argv[0] is the subcommand. */
static int run_register_or_prune(int argc, char **argv, bool prune)
{
	static const struct option lo[] = {
		{"registry", required_argument, NULL, O_REGISTRY}, {"keystore", required_argument, NULL, O_KEYSTORE},
		{"all", no_argument, NULL, O_ALL}, {"create", no_argument, NULL, O_CREATE},
		{"workspace", required_argument, NULL, O_WORKSPACE}, {"data-flow", required_argument, NULL, O_DATA_FLOW},
		{"cert", no_argument, NULL, O_CERT}, {"days", required_argument, NULL, O_DAYS},
		{"dry-run", no_argument, NULL, O_DRY_RUN}, {"json", no_argument, NULL, O_JSON},
		CTL_API_LONGOPTS, CTL_KEY_LONGOPTS,
		{"help", no_argument, NULL, O_HELP}, {NULL, 0, NULL, 0}};
	const char *help = prune ? prune_help : register_help;
	struct ctl_api_args a = {.max_retries = -1};
	struct fleet_opts o = {.days = AKZ_X509_DAYS_DEFAULT};
	struct akz_key_opts ko = {0};
	const char *registry = NULL, *keystore = NULL;
	bool all = false, days_given = false;
	int c;
	optind = 1;
	while((c = getopt_long(argc, argv, "", lo, NULL)) != -1){
		int api = ctl_api_option(c, optarg, &a);
		if(api < 0) return 2;
		if(api || ctl_key_option(c, optarg, &ko)) continue;
		bool register_only = c == O_CREATE || c == O_WORKSPACE || c == O_DATA_FLOW || c == O_CERT || c == O_DAYS;
		if(prune && register_only){
			ctl_error("prune: option '%s' does not apply", argv[optind - 1]);
			return 2;
		}
		switch(c){
		case O_REGISTRY: registry = optarg; break;
		case O_KEYSTORE: keystore = optarg; break;
		case O_ALL: all = true; break;
		case O_CREATE: o.create = true; break;
		case O_WORKSPACE: o.workspace = optarg; break;
		case O_DATA_FLOW: o.data_flow = optarg; break;
		case O_CERT: o.cert = true; break;
		case O_DAYS: {
			char *end;
			errno = 0;
			long v = strtol(optarg, &end, 10);
			if(errno || end == optarg || *end || v < 1 || v > AKZ_X509_DAYS_MAX){
				ctl_error("--days: '%s' is not a number from 1 to %d", optarg, AKZ_X509_DAYS_MAX);
				return 2;
			}
			o.days = (int)v;
			days_given = true;
			break;
		}
		case O_DRY_RUN: o.dry_run = true; break;
		case O_JSON: o.json = true; break;
		case O_HELP: printf("%s%s", help, ctl_api_help); return 0;
		default: fprintf(stderr, "%s%s", help, ctl_api_help); return 2;
		}
	}
	size_t nids = (size_t)(argc - optind);
	const char *why = registry == NULL ? "--registry FILE is needed (the devices and their keys)"
			: all == (nids > 0) ? "give device IDs or --all (not both)"
			: o.create != (o.workspace != NULL && o.data_flow != NULL) ? "--create goes with --workspace and --data-flow"
			: (o.workspace || o.data_flow) && !o.create ? "--workspace and --data-flow go with --create"
			: days_given && !o.cert ? "--days goes with --cert" : NULL;
	if(why){
		ctl_error("akenza %s: %s", argv[0], why);
		fprintf(stderr, "%s", help);
		return 2;
	}
	struct fleet f = {0};
	int rc = 1;
	if(fleet_from_registry(&f, registry, keystore, &ko, argv + optind, nids, all, &o) == 0){
		rc = run_fleet(&a, &o, &f, prune);
	}
	fleet_free(&f);
	return rc;
}

int cmd_akenza(int argc, char **argv)
{
	if(argc < 2){
		fprintf(stderr, "%s%s", group_help, ctl_api_help);
		return 2;
	}
	if(strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "help") == 0){
		printf("%s%s", group_help, ctl_api_help);
		return 0;
	}
	if(strcmp(argv[1], "register") == 0) return run_register_or_prune(argc - 1, argv + 1, false);
	if(strcmp(argv[1], "prune") == 0) return run_register_or_prune(argc - 1, argv + 1, true);
	if(strcmp(argv[1], "import") == 0) return cmd_import(argc - 1, argv + 1);
	ctl_error("akenza: unknown command '%s'", argv[1]);
	fprintf(stderr, "%s", group_help);
	return 2;
}
