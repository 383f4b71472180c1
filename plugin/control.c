/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* control.c - the $CONTROL/akenza/v1 API: device and gateway commands, applied live and saved
 * to the registry file atomically.
 *
 * Requests look like dynamic-security's: {"commands":[{"command":"...", ...}, ...]}; every
 * command gets one answer in {"responses":[...]} on $CONTROL/akenza/v1/response, with "data" or
 * "error" and the command's "correlationData" echoed. Who may send them is the broker's ACL
 * business (acl_file or dynamic-security on $CONTROL/akenza/#).
 *
 * A change edits the registry file's own JSON tree (fields this code does not know survive),
 * writes it to <file>.tmp, loads that with akz_registry_load exactly as a start or a SIGHUP
 * would, and only if it loads renames it over the file and puts it in force by the SIGHUP path.
 * A request that fails anywhere changes nothing. Everything runs on the broker thread, so two
 * requests never interleave. */
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cJSON.h>
#include <openssl/evp.h>
#include "akz_mosquitto.h"
#include "akz_bridge.h"
#include "akz_control.h"
#include "akz_keystore.h"
#include "akz_passwd.h"
#include "akz_plugin.h"
#include "akz_regfile.h"
#include "akz_registry.h"
#include "akz_status.h"
#include "akz_util.h"
#include "akz_x509.h"

#define PASSWORD_MAX 1024
#define ERR_MAX 1024

/* One command being answered. */
struct req {
	struct akz_plugin *p;
	const char *user;          /* the requesting client, escaped for the log */
	const char *client;
	const cJSON *cmd;
	const char *command;
	const char *corr;          /* correlationData to echo, or NULL */
	cJSON *responses;
};

/* ---- answers ------------------------------------------------------------------------------- */

/* Appends one answer: data (taken, may be NULL) or error. Out of memory loses the answer (the
 * client's wait times out), which is logged. */
static void reply(struct req *r, cJSON *data, const char *error)
{
	cJSON *o = cJSON_CreateObject();
	bool ok = o && cJSON_AddStringToObject(o, "command", r->command)
			&& (error == NULL || cJSON_AddStringToObject(o, "error", error))
			&& (r->corr == NULL || cJSON_AddStringToObject(o, "correlationData", r->corr));
	if(ok && data){
		ok = cJSON_AddItemToObject(o, "data", data);
		if(ok) data = NULL;
	}
	if(ok) ok = cJSON_AddItemToArray(r->responses, o);
	if(!ok){
		cJSON_Delete(data);
		cJSON_Delete(o);
		mosquitto_log_printf(MOSQ_LOG_ERR, "akenza: control: out of memory answering %s of user '%s'",
				akz_esc(r->command), r->user);
	}
}

/* Answers an error and logs it with the client and the reason (never a secret: reasons are
 * built from ids, usernames, paths and library messages only). */
static void fail(struct req *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void fail(struct req *r, const char *fmt, ...)
{
	char msg[ERR_MAX];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "akenza: control: %s from user '%s' (client '%s') refused: %s",
			akz_esc(r->command), r->user, r->client, akz_esc(msg));
	reply(r, NULL, msg);
}

static void nomem(struct req *r)
{
	fail(r, "out of memory");
}

/* Logs a change that took effect. */
static void done(struct req *r, const char *what)
{
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "akenza: control: %s %s by user '%s' (client '%s')",
			akz_esc(r->command), akz_esc(what), r->user, r->client);
}

/* ---- reading the request ------------------------------------------------------------------ */

/* Refuses fields a command does not know: a typo ("enable" for "enabled") must not pass as
 * "not given". "command" and "correlationData" are always allowed. Returns 0, or -1 after
 * answering. */
static int check_fields(struct req *r, const char *const *known)
{
	for(const cJSON *f = r->cmd->child; f; f = f->next){
		bool ok = strcmp(f->string, "command") == 0 || strcmp(f->string, "correlationData") == 0;
		for(const char *const *k = known; !ok && *k; k++) ok = strcmp(f->string, *k) == 0;
		if(!ok){
			fail(r, "unknown field '%s'", f->string);
			return -1;
		}
	}
	return 0;
}

/* A string field: *out is the value, or NULL when absent and not required.
 * Returns 0, or -1 after answering (missing, not a string). */
static int get_string(struct req *r, const char *name, bool required, const char **out)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(r->cmd, name);
	*out = NULL;
	if(v == NULL){
		if(!required) return 0;
		fail(r, "missing field '%s'", name);
		return -1;
	}
	if(!cJSON_IsString(v) || v->valuestring == NULL){
		fail(r, "field '%s' must be a string", name);
		return -1;
	}
	*out = v->valuestring;
	return 0;
}

/* An optional boolean field: *set tells whether it was given. Returns 0, or -1 after answering. */
static int get_bool(struct req *r, const char *name, bool *set, bool *out)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(r->cmd, name);
	*set = v != NULL;
	if(v && !cJSON_IsBool(v)){
		fail(r, "field '%s' must be true or false", name);
		return -1;
	}
	*out = v && cJSON_IsTrue(v);
	return 0;
}

/* A device id: a string that akz_registry_load would accept. Returns 0, or -1 after answering. */
static int get_id(struct req *r, const char **id)
{
	if(get_string(r, "id", true, id)) return -1;
	const char *why = akz_registry_bad_id_reason(*id);
	if(why){
		fail(r, "invalid id: it %s", why);
		return -1;
	}
	return 0;
}

static int check_username(struct req *r, const char *u)
{
	const char *why = akz_registry_bad_username_reason(u);
	if(why){
		fail(r, "invalid username: it %s", why);
		return -1;
	}
	return 0;
}

/* Hashes a plain-text password as $7$ (as mosquitto_passwd does). Returns the hash (caller
 * frees), or NULL after answering. The password is never logged or stored as given. */
static char *hash_password(struct req *r, const char *password)
{
	char err[256];
	if(password[0] == '\0' || strlen(password) > PASSWORD_MAX){
		fail(r, "password must be 1 to %d bytes", PASSWORD_MAX);
		return NULL;
	}
	char *hash = akz_pw_hash(password, AKZ_PW_ITERATIONS_DEFAULT, err, sizeof(err));
	if(hash == NULL) fail(r, "cannot hash the password: %s", err);
	return hash;
}

/* What to do about a key. */
struct keyspec {
	const char *uri;     /* use this key (path or OSSL_STORE URI), or NULL: generate */
	enum akz_alg alg;
	int bits;
	const char *store;   /* generate inside this provider's device ("tpm2"), or NULL: in a file */
};

/* Parses "store": "file" or "tpm2" (NULL: def) into ks->store. Returns 0, or -1 after answering. */
static int parse_store(struct req *r, const cJSON *store, const char *def, struct keyspec *ks)
{
	ks->store = def;
	if(store == NULL) return 0;
	if(!cJSON_IsString(store) || (strcmp(store->valuestring, "file") != 0 && strcmp(store->valuestring, "tpm2") != 0)){
		fail(r, "key store must be \"file\" or \"tpm2\" (generate the key inside the TPM)");
		return -1;
	}
	ks->store = strcmp(store->valuestring, "tpm2") == 0 ? "tpm2" : NULL;
	return 0;
}

/* Parses {"type":"ec"|"rsa","bits":N} or {"uri":"..."}. def_alg/def_bits apply when "type"
 * or "bits" are absent (AKZ_ALG_NONE: "type" is required). Returns 0, or -1 after answering. */
static int parse_keygen(struct req *r, const cJSON *type, const cJSON *bits, enum akz_alg def_alg,
		int def_bits, struct keyspec *ks)
{
	ks->uri = NULL;
	ks->alg = def_alg;
	ks->bits = def_bits;
	if(type){
		if(!cJSON_IsString(type)){
			fail(r, "key type must be \"ec\" or \"rsa\"");
			return -1;
		}
		if(strcmp(type->valuestring, "ec") == 0) ks->alg = AKZ_ALG_ES256;
		else if(strcmp(type->valuestring, "rsa") == 0) ks->alg = AKZ_ALG_RS256;
		else{
			fail(r, "key type '%s' is not \"ec\" or \"rsa\"", type->valuestring);
			return -1;
		}
		if(ks->alg != def_alg) ks->bits = 2048;
	}
	if(ks->alg == AKZ_ALG_NONE){
		fail(r, "missing key type (\"ec\" or \"rsa\")");
		return -1;
	}
	if(bits){
		double v = cJSON_IsNumber(bits) ? bits->valuedouble : 0;
		if(ks->alg != AKZ_ALG_RS256){
			fail(r, "key bits apply to rsa keys only (ec keys are P-256)");
			return -1;
		}
		if(v != 2048 && v != 3072 && v != 4096){
			fail(r, "key bits must be 2048, 3072 or 4096");
			return -1;
		}
		ks->bits = (int)v;
	}
	return 0;
}

/* The "key" object of createDevice and modifyDevice. Returns 0, or -1 after answering. */
static int parse_keyspec(struct req *r, const cJSON *key, struct keyspec *ks)
{
	if(!cJSON_IsObject(key)){
		fail(r, "field 'key' must be an object: {\"type\":\"ec\"|\"rsa\",\"bits\":N} or {\"uri\":\"...\"}");
		return -1;
	}
	const cJSON *uri = cJSON_GetObjectItemCaseSensitive(key, "uri");
	const cJSON *type = cJSON_GetObjectItemCaseSensitive(key, "type");
	const cJSON *bits = cJSON_GetObjectItemCaseSensitive(key, "bits");
	const cJSON *store = cJSON_GetObjectItemCaseSensitive(key, "store");
	for(const cJSON *f = key->child; f; f = f->next){
		if(strcmp(f->string, "uri") != 0 && strcmp(f->string, "type") != 0 && strcmp(f->string, "bits") != 0
				&& strcmp(f->string, "store") != 0){
			fail(r, "unknown field 'key.%s'", f->string);
			return -1;
		}
	}
	if(uri){
		if(type || bits || store){
			fail(r, "field 'key' takes either \"uri\" or \"type\"/\"bits\"/\"store\", not both");
			return -1;
		}
		if(!cJSON_IsString(uri) || uri->valuestring[0] == '\0'){
			fail(r, "field 'key.uri' must be a non-empty string");
			return -1;
		}
		ks->uri = uri->valuestring;
		ks->alg = AKZ_ALG_NONE;
		ks->store = NULL;
		return 0;
	}
	return parse_keygen(r, type, bits, AKZ_ALG_NONE, 2048, ks) || parse_store(r, store, NULL, ks) ? -1 : 0;
}

/* ---- the registry file as a tree ------------------------------------------------------------ */

static cJSON *tree_array(cJSON *root, const char *name)
{
	cJSON *a = cJSON_GetObjectItemCaseSensitive(root, name);
	return cJSON_IsArray(a) ? a : NULL;
}

static const char *obj_string(const cJSON *o, const char *name)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
	return cJSON_IsString(v) ? v->valuestring : NULL;
}

/* The device object with that id, or NULL; *index is its position in "devices". */
static cJSON *tree_device(cJSON *root, const char *id, int *index)
{
	int i = 0;
	for(cJSON *o = tree_array(root, "devices") ? tree_array(root, "devices")->child : NULL; o; o = o->next, i++){
		const char *v = obj_string(o, "id");
		if(v && strcmp(v, id) == 0){
			if(index) *index = i;
			return o;
		}
	}
	return NULL;
}

static cJSON *tree_gateway(cJSON *root, const char *username, int *index)
{
	int i = 0;
	for(cJSON *o = tree_array(root, "gateways") ? tree_array(root, "gateways")->child : NULL; o; o = o->next, i++){
		const char *v = obj_string(o, "username");
		if(v && strcmp(v, username) == 0){
			if(index) *index = i;
			return o;
		}
	}
	return NULL;
}

/* True if a device (username, defaulting to its id) or a gateway other than `except` uses
 * username: the registry refuses duplicates, and a clear answer beats a load error. */
static bool username_taken(cJSON *root, const char *username, const cJSON *except)
{
	for(cJSON *o = tree_array(root, "devices") ? tree_array(root, "devices")->child : NULL; o; o = o->next){
		const char *u = obj_string(o, "username");
		if(u == NULL) u = obj_string(o, "id");
		if(o != except && u && strcmp(u, username) == 0) return true;
	}
	for(cJSON *o = tree_array(root, "gateways") ? tree_array(root, "gateways")->child : NULL; o; o = o->next){
		const char *u = obj_string(o, "username");
		if(o != except && u && strcmp(u, username) == 0) return true;
	}
	return false;
}

/* Sets o[name] = v (v taken; NULL means out of memory). Returns false when out of memory. */
static bool set_field(cJSON *o, const char *name, cJSON *v)
{
	if(v == NULL) return false;
	if(cJSON_GetObjectItemCaseSensitive(o, name)){
		if(cJSON_ReplaceItemInObjectCaseSensitive(o, name, v)) return true;
		cJSON_Delete(v);   /* only fails before v is linked in */
		return false;
	}
	if(!cJSON_AddItemToObject(o, name, v)){
		cJSON_Delete(v);
		return false;
	}
	return true;
}

/* Reads the registry file. NULL after answering. The file, not the registry in force, is what
 * a change edits: hand edits not yet reloaded are kept and put in force with it. */
static cJSON *open_tree(struct req *r)
{
	char err[ERR_MAX];
	cJSON *root = akz_regfile_read(r->p->cfg.devices_path, err, sizeof(err));
	if(root == NULL){
		fail(r, "%s", err);
		return NULL;
	}
	if(!cJSON_IsObject(root) || tree_array(root, "devices") == NULL){
		fail(r, "%s: no \"devices\" array at the top level", r->p->cfg.devices_path);
		cJSON_Delete(root);
		return NULL;
	}
	return root;
}

/* The first problems akz_registry_load reported, without the temporary file's name. */
struct problems {
	const char *prefix;
	size_t prefixlen;
	int n;
	char text[ERR_MAX];
};

static void collect_problem(void *ctx, const char *msg)
{
	struct problems *pr = ctx;
	if(strncmp(msg, pr->prefix, pr->prefixlen) == 0 && strncmp(msg + pr->prefixlen, ": ", 2) == 0){
		msg += pr->prefixlen + 2;
	}
	size_t used = strlen(pr->text);
	if(pr->n < 3 && used < sizeof(pr->text) - 1){
		snprintf(pr->text + used, sizeof(pr->text) - used, "%s%s", pr->n ? "; " : "", msg);
	}
	pr->n++;
}

/* Saves root (freed here) as the registry and puts it in force. Returns 0, or -1 after
 * answering (quiet: without answering, for a best-effort step whose caller has answered already);
 * on -1 the file and the registry in force are as they were, except in the one case said in the
 * answer (saved, but the bridge ran out of memory applying it). Unchanged key files are taken over
 * from the registry in force rather than parsed again (see akz_registry_reload). */
static int save_tree(struct req *r, cJSON *root, bool quiet)
{
	struct akz_plugin *p = r->p;
	char err[ERR_MAX];
	const char *path = p->cfg.devices_path;

	char *tmp = akz_regfile_write_tmp(path, root, err, sizeof(err));
	cJSON_Delete(root);
	if(tmp == NULL){
		if(!quiet) fail(r, "%s", err);
		return -1;
	}
	struct akz_key_opts ko = {
		.passphrase_file = p->cfg.key_passphrase_file,
		.allow_group_readable = p->cfg.allow_readable_keys,
	};
	struct problems pr = {.prefix = tmp, .prefixlen = strlen(tmp)};
	struct akz_registry *reg = NULL;
	if(akz_registry_reload(tmp, p->cfg.keystore_dir, &ko, p->reg, collect_problem, &pr, &reg)){
		unlink(tmp);
		free(tmp);
		if(!quiet) fail(r, "the registry would be invalid: %s%s", pr.text, pr.n > 3 ? "; ..." : "");
		return -1;
	}
	int rc = akz_regfile_replace(tmp, path, err, sizeof(err));
	if(rc < 0){
		unlink(tmp);
		free(tmp);
		akz_registry_free(reg);
		if(!quiet) fail(r, "%s", err);
		return -1;
	}
	free(tmp);
	if(rc > 0) mosquitto_log_printf(MOSQ_LOG_WARNING, "akenza: control: %s", akz_esc(err));
	if(akz_plugin_apply_registry(p, reg)){
		if(!quiet) fail(r, "saved to %s, but out of memory putting it in force: send SIGHUP to retry", path);
		return -1;
	}
	return 0;
}

/* ---- key files ---------------------------------------------------------------------------- */

/* Generates a key and writes it to <keystore>/<id><suffix> (0600) and the public key to
 * <keystore>/<id><pubsuffix>. Returns the key (one reference) and the two paths (caller frees),
 * or NULL after answering (nothing written then). */
static struct akz_key *make_key_files(struct req *r, const char *id, const char *suffix,
		const char *pubsuffix, const struct keyspec *ks, char **priv, char **pub)
{
	const struct akz_config *cfg = &r->p->cfg;
	char err[ERR_MAX];
	struct akz_key *key = NULL;

	*priv = akz_registry_keystore_path(cfg->devices_path, cfg->keystore_dir, id, suffix);
	*pub = akz_registry_keystore_path(cfg->devices_path, cfg->keystore_dir, id, pubsuffix);
	if(*priv == NULL || *pub == NULL){
		fail(r, "key file path too long or out of memory");
		goto fail;
	}
	/* The key store may not exist yet on a fresh gateway: make it, closed to others. */
	char dir[PATH_MAX];
	snprintf(dir, sizeof(dir), "%s", *priv);
	char *slash = strrchr(dir, '/');
	if(slash){
		*slash = '\0';
		if(mkdir(dir, 0700) != 0 && errno != EEXIST){
			fail(r, "cannot create the key store %s: %s", dir, strerror(errno));
			goto fail;
		}
	}
	/* Key generation runs on the broker thread: an EC key takes well under a millisecond,
	 * an RSA 4096 key can take a second or more (documented). In a TPM it runs on the key
	 * thread, and the broker waits at most plugin_opt_key_timeout for it. */
	if(ks->store ? akz_key_generate_in(ks->store, ks->alg, ks->bits, &key, err, sizeof(err))
			: akz_key_generate(ks->alg, ks->bits, &key, err, sizeof(err))){
		fail(r, "cannot generate the key: %s", err);
		goto fail;
	}
	if(akz_key_write(key, *priv, *pub, err, sizeof(err))){
		/* akz_key_write refuses to overwrite; it may have written the private part only. */
		if(strstr(err, *pub)) unlink(*priv);
		fail(r, "%s", err);
		goto fail;
	}
	akz_regfile_sync_dir(*priv);
	return key;
fail:
	akz_key_unref(key);
	free(*priv);
	free(*pub);
	*priv = *pub = NULL;
	return NULL;
}

/* Removes key files written for a change that did not happen. NULLs are ignored. */
static void unmake_key_files(char *priv, char *pub)
{
	if(priv) unlink(priv);
	if(pub) unlink(pub);
	free(priv);
	free(pub);
}

/* An absolute form of a file we just wrote, for the registry: a relative one would be read
 * against the registry's directory. Returns a new string, or NULL. */
static char *absolute(const char *path)
{
	char buf[PATH_MAX];
	return realpath(path, buf) ? strdup(buf) : NULL;
}

/* ---- describing ------------------------------------------------------------------------------- */

static const char *alg_type(enum akz_alg alg)
{
	return alg == AKZ_ALG_ES256 ? "ec" : alg == AKZ_ALG_RS256 ? "rsa" : "none";
}

/* Adds name: {"uri","kid","algorithm","type","public_key"} of key to o. Returns false when out
 * of memory. */
static bool add_key(cJSON *o, const char *name, const char *uri, const struct akz_key *key)
{
	/* The public key goes along, so that it can be uploaded to akenza again at any time. */
	char *pem = akz_key_public_pem(key);
	cJSON *k = pem ? cJSON_AddObjectToObject(o, name) : NULL;
	bool ok = k && cJSON_AddStringToObject(k, "uri", uri) && cJSON_AddStringToObject(k, "kid", akz_key_kid(key))
			&& cJSON_AddStringToObject(k, "algorithm", akz_alg_name(akz_key_alg(key)))
			&& cJSON_AddStringToObject(k, "type", alg_type(akz_key_alg(key)))
			&& cJSON_AddStringToObject(k, "store", akz_key_store(key))
			&& cJSON_AddStringToObject(k, "public_key", pem);
	free(pem);
	return ok;
}

/* Adds "certificate": a self-signed certificate of key with CN=id (akenza's *_X509_PEM form of
 * the credential), or "certificate_error" saying why there is none (an id longer than X.509's
 * 64-character common name). Both are a convenience: a missing one fails nothing. */
static void add_certificate(cJSON *o, const struct akz_key *key, const char *id)
{
	char err[ERR_MAX];
	char *cert = akz_x509_self_signed(key, id, AKZ_X509_DAYS_DEFAULT, err, sizeof(err));
	if(cert) cJSON_AddStringToObject(o, "certificate", cert);
	else cJSON_AddStringToObject(o, "certificate_error", err);
	free(cert);
}

/* A device as getDevice shows it: registry fields (never the password hash) and, with live,
 * the bridge's state. Returns a new object, or NULL when out of memory. */
static cJSON *describe_device(const struct akz_plugin *p, const struct akz_device *d, bool live)
{
	cJSON *o = cJSON_CreateObject();
	bool ok = o && cJSON_AddStringToObject(o, "id", d->id) && cJSON_AddStringToObject(o, "username", d->username)
			&& cJSON_AddBoolToObject(o, "enabled", d->enabled)
			&& cJSON_AddStringToObject(o, "kid", akz_key_kid(d->key))
			&& add_key(o, "key", d->key_uri, d->key)
			&& (d->next_key == NULL || add_key(o, "next_key", d->next_key_uri, d->next_key));
	if(ok && live){
		struct akz_status_dev st;
		if(p->bridge == NULL){
			ok = cJSON_AddStringToObject(o, "state", "bridge off") != NULL;
		}else if(akz_bridge_device_status(p->bridge, d->id, &st) != 0){
			ok = cJSON_AddStringToObject(o, "state", "unknown") != NULL;
		}else{
			/* "kid" is the registry's key here: the one the connection uses is upstream_kid */
			ok = akz_status_device_fields(o, &st, "upstream_kid");
		}
	}
	if(!ok){
		cJSON_Delete(o);
		return NULL;
	}
	return o;
}

static cJSON *describe_gateway(const struct akz_gateway *g)
{
	cJSON *o = cJSON_CreateObject();
	cJSON *devs = o && cJSON_AddStringToObject(o, "username", g->username) ? cJSON_AddArrayToObject(o, "devices") : NULL;
	bool ok = devs != NULL;
	if(ok && g->all_devices) ok = cJSON_AddItemToArray(devs, cJSON_CreateString("*"));
	for(size_t i = 0; ok && i < g->ndevices; i++) ok = cJSON_AddItemToArray(devs, cJSON_CreateString(g->devices[i]));
	if(!ok){
		cJSON_Delete(o);
		return NULL;
	}
	return o;
}

/* The device in force, or NULL after answering "unknown device". */
static const struct akz_device *known_device(struct req *r, const char *id)
{
	const struct akz_device *d = akz_registry_find_device(r->p->reg, id);
	if(d == NULL) fail(r, "unknown device '%s'", id);
	return d;
}

/* Answers with the device as it is now in force, plus extra fields (taken, may be NULL). */
static void reply_device(struct req *r, const char *id, cJSON *extra)
{
	const struct akz_device *d = akz_registry_find_device(r->p->reg, id);
	cJSON *o = d ? describe_device(r->p, d, false) : cJSON_CreateObject();
	if(o == NULL){
		cJSON_Delete(extra);
		nomem(r);
		return;
	}
	for(cJSON *f = extra ? extra->child : NULL; f;){
		cJSON *next = f->next;
		cJSON *item = cJSON_DetachItemViaPointer(extra, f);
		cJSON_DeleteItemFromObjectCaseSensitive(o, item->string);
		if(!cJSON_AddItemToObject(o, item->string, item)) cJSON_Delete(item);
		f = next;
	}
	cJSON_Delete(extra);
	reply(r, o, NULL);
}

/* Saves the edited tree (taking it, as save_tree does) and logs the change as `what`.
 * Returns 0, or -1 after the error was answered (nothing changed then). */
static int commit(struct req *r, cJSON *root, const char *what)
{
	if(save_tree(r, root, false)) return -1;
	done(r, what);
	return 0;
}

/* Answers a list command: data (taken) with its "totalCount", or "out of memory" when !ok. */
static void reply_list(struct req *r, cJSON *data, bool ok, size_t n)
{
	if(ok) ok = cJSON_AddNumberToObject(data, "totalCount", (double)n) != NULL;
	if(!ok){
		cJSON_Delete(data);
		nomem(r);
		return;
	}
	reply(r, data, NULL);
}

/* ---- device commands ------------------------------------------------------------------------ */

/* Each cmd_* handles one command object (r->cmd): it answers exactly once, with data or with an
 * error, and when it answers an error the registry file, the key store and the registry in force
 * are as they were. The device or registry pointers it reads before a save_tree are stale after
 * it (the registry in force is replaced), so it looks them up again. */

static void cmd_list_devices(struct req *r)
{
	static const char *const known[] = {NULL};
	if(check_fields(r, known)) return;
	cJSON *data = cJSON_CreateObject();
	cJSON *arr = data ? cJSON_AddArrayToObject(data, "devices") : NULL;
	size_t n = akz_registry_device_count(r->p->reg);
	bool ok = arr != NULL;
	for(size_t i = 0; ok && i < n; i++){
		const struct akz_device *d = akz_registry_device_at(r->p->reg, i);
		cJSON *o = cJSON_CreateObject();
		ok = o && cJSON_AddStringToObject(o, "id", d->id) && cJSON_AddStringToObject(o, "username", d->username)
				&& cJSON_AddBoolToObject(o, "enabled", d->enabled)
				&& cJSON_AddStringToObject(o, "kid", akz_key_kid(d->key))
				&& (d->next_key == NULL || cJSON_AddStringToObject(o, "next_kid", akz_key_kid(d->next_key)));
		if(ok) ok = cJSON_AddItemToArray(arr, o);
		else cJSON_Delete(o);
	}
	reply_list(r, data, ok, n);
}

static void cmd_get_device(struct req *r)
{
	static const char *const known[] = {"id", NULL};
	const char *id;
	if(check_fields(r, known) || get_id(r, &id)) return;
	const struct akz_device *d = known_device(r, id);
	if(d == NULL) return;
	cJSON *data = cJSON_CreateObject();
	cJSON *o = describe_device(r->p, d, true);
	if(data == NULL || o == NULL || !cJSON_AddItemToObject(data, "device", o)){
		cJSON_Delete(o);
		cJSON_Delete(data);
		nomem(r);
		return;
	}
	reply(r, data, NULL);
}

static void cmd_create_device(struct req *r)
{
	static const char *const known[] = {"id", "username", "password", "key", "enabled", NULL};
	const char *id, *username, *password;
	bool en_set, enabled;
	struct keyspec ks;
	if(check_fields(r, known) || get_id(r, &id) || get_string(r, "username", false, &username)
			|| get_string(r, "password", true, &password) || get_bool(r, "enabled", &en_set, &enabled)){
		return;
	}
	const cJSON *key = cJSON_GetObjectItemCaseSensitive(r->cmd, "key");
	if(key == NULL){
		fail(r, "missing field 'key': {\"type\":\"ec\"|\"rsa\",\"bits\":N} or {\"uri\":\"...\"}");
		return;
	}
	if(parse_keyspec(r, key, &ks) || (username && check_username(r, username))) return;
	if(!en_set) enabled = true;

	cJSON *root = open_tree(r);
	if(root == NULL) return;
	char *hash = NULL, *priv = NULL, *pub = NULL;
	struct akz_key *newkey = NULL;
	if(tree_device(root, id, NULL)){
		fail(r, "device '%s' already exists", id);
		goto out;
	}
	if(username_taken(root, username ? username : id, NULL)){
		fail(r, "username '%s' is already used by a device or a gateway", username ? username : id);
		goto out;
	}
	hash = hash_password(r, password);
	if(hash == NULL) goto out;
	if(ks.uri == NULL){
		newkey = make_key_files(r, id, ".pem", ".pub.pem", &ks, &priv, &pub);
		if(newkey == NULL) goto out;
	}
	cJSON *o = cJSON_CreateObject();
	if(o == NULL || !cJSON_AddItemToArray(tree_array(root, "devices"), o)){
		cJSON_Delete(o);
		nomem(r);
		goto out;
	}
	if(!cJSON_AddStringToObject(o, "id", id) || (username && !cJSON_AddStringToObject(o, "username", username))
			|| !cJSON_AddStringToObject(o, "password", hash)
			|| (ks.uri && !cJSON_AddStringToObject(o, "key", ks.uri))
			|| !cJSON_AddBoolToObject(o, "enabled", enabled)){
		nomem(r);
		goto out;
	}
	int rc = commit(r, root, id);
	root = NULL;
	if(rc) goto out;
	const struct akz_device *d = akz_registry_find_device(r->p->reg, id);
	char *pem = d ? akz_key_public_pem(d->key) : NULL;
	cJSON *extra = cJSON_CreateObject();
	if(extra && pem) cJSON_AddStringToObject(extra, "public_key", pem);
	if(extra && d) add_certificate(extra, d->key, id);
	if(extra && priv) cJSON_AddStringToObject(extra, "key_file", priv);
	if(extra && pub) cJSON_AddStringToObject(extra, "public_key_file", pub);
	if(extra) cJSON_AddStringToObject(extra, "note", "upload public_key to the device in akenza "
			"(device credentials, JWT); its kid is the one shown");
	free(pem);
	reply_device(r, id, extra);
	free(priv);
	free(pub);
	priv = pub = NULL;
out:
	unmake_key_files(priv, pub);   /* only set when the change did not happen */
	akz_key_unref(newkey);
	free(hash);
	cJSON_Delete(root);
}

static void cmd_modify_device(struct req *r)
{
	static const char *const known[] = {"id", "username", "password", "key", "enabled", NULL};
	const char *id, *username, *password;
	bool en_set, enabled;
	struct keyspec ks = {0};
	if(check_fields(r, known) || get_id(r, &id) || get_string(r, "username", false, &username)
			|| get_string(r, "password", false, &password) || get_bool(r, "enabled", &en_set, &enabled)){
		return;
	}
	const cJSON *key = cJSON_GetObjectItemCaseSensitive(r->cmd, "key");
	if(key && parse_keyspec(r, key, &ks)) return;
	if(key && ks.uri == NULL){
		/* Swapping in a fresh key at once would lock the device out of akenza until its new
		 * public key is uploaded: rotateKey keeps the old key in use until commitKey. */
		fail(r, "a new key is made with rotateKey and put in use with commitKey; 'key' here takes {\"uri\":...} only");
		return;
	}
	if(username == NULL && password == NULL && !en_set && key == NULL){
		fail(r, "nothing to change: give username, password, enabled or key");
		return;
	}
	if(username && check_username(r, username)) return;

	cJSON *root = open_tree(r);
	if(root == NULL) return;
	char *hash = NULL;
	cJSON *o = tree_device(root, id, NULL);
	if(o == NULL){
		fail(r, "unknown device '%s'", id);
		goto out;
	}
	if(username && username_taken(root, username, o)){
		fail(r, "username '%s' is already used by a device or a gateway", username);
		goto out;
	}
	if(password && (hash = hash_password(r, password)) == NULL) goto out;
	if((username && !set_field(o, "username", cJSON_CreateString(username)))
			|| (hash && !set_field(o, "password", cJSON_CreateString(hash)))
			|| (en_set && !set_field(o, "enabled", cJSON_CreateBool(enabled)))
			|| (ks.uri && !set_field(o, "key", cJSON_CreateString(ks.uri)))){
		nomem(r);
		goto out;
	}
	int rc = commit(r, root, id);
	root = NULL;
	if(rc) goto out;
	reply_device(r, id, NULL);
out:
	free(hash);
	cJSON_Delete(root);
}

/* enableDevice and disableDevice. */
static void set_enabled(struct req *r, bool enabled)
{
	static const char *const known[] = {"id", NULL};
	const char *id;
	if(check_fields(r, known) || get_id(r, &id)) return;
	cJSON *root = open_tree(r);
	if(root == NULL) return;
	cJSON *o = tree_device(root, id, NULL);
	if(o == NULL){
		fail(r, "unknown device '%s'", id);
		cJSON_Delete(root);
		return;
	}
	if(!set_field(o, "enabled", cJSON_CreateBool(enabled))){
		nomem(r);
		cJSON_Delete(root);
		return;
	}
	if(save_tree(r, root, false)) return;
	done(r, id);
	reply_device(r, id, NULL);
}

static void cmd_enable_device(struct req *r) { set_enabled(r, true); }
static void cmd_disable_device(struct req *r) { set_enabled(r, false); }

static void cmd_delete_device(struct req *r)
{
	static const char *const known[] = {"id", NULL};
	const char *id;
	if(check_fields(r, known) || get_id(r, &id)) return;
	cJSON *root = open_tree(r);
	if(root == NULL) return;
	int index;
	cJSON *extra = cJSON_CreateObject();
	cJSON *gws = extra ? cJSON_AddArrayToObject(extra, "removed_from_gateways") : NULL;
	cJSON *files = extra ? cJSON_AddArrayToObject(extra, "key_files_kept") : NULL;
	if(gws == NULL || files == NULL){
		nomem(r);
		goto out;
	}
	if(tree_device(root, id, &index) == NULL){
		fail(r, "unknown device '%s'", id);
		goto out;
	}
	cJSON_DeleteItemFromArray(tree_array(root, "devices"), index);
	/* A gateway naming a device the registry lacks would make the registry invalid: the
	 * device leaves the gateways' lists too, and the answer says which. */
	for(cJSON *g = tree_array(root, "gateways") ? tree_array(root, "gateways")->child : NULL; g; g = g->next){
		cJSON *devs = cJSON_GetObjectItemCaseSensitive(g, "devices");
		int k = 0;
		for(cJSON *v = devs && cJSON_IsArray(devs) ? devs->child : NULL; v; k++){
			cJSON *next = v->next;
			if(cJSON_IsString(v) && strcmp(v->valuestring, id) == 0){
				cJSON_DeleteItemFromArray(devs, k--);
				const char *u = obj_string(g, "username");
				cJSON_AddItemToArray(gws, cJSON_CreateString(u ? u : "?"));
			}
			v = next;
		}
	}
	const struct akz_device *d = akz_registry_find_device(r->p->reg, id);
	if(d){
		cJSON_AddItemToArray(files, cJSON_CreateString(d->key_uri));
		if(d->next_key_uri) cJSON_AddItemToArray(files, cJSON_CreateString(d->next_key_uri));
	}
	int rc = commit(r, root, id);
	root = NULL;
	if(rc) goto out;
	if(!cJSON_AddStringToObject(extra, "id", id)
			|| !cJSON_AddStringToObject(extra, "note", "the device's key files were left in place: "
				"delete them when nothing needs them any more")){
		nomem(r);
		goto out;
	}
	reply(r, extra, NULL);
	extra = NULL;
out:
	cJSON_Delete(extra);
	cJSON_Delete(root);
}

static void cmd_rotate_key(struct req *r)
{
	static const char *const known[] = {"id", "type", "bits", "store", NULL};
	const char *id;
	struct keyspec ks;
	if(check_fields(r, known) || get_id(r, &id)) return;
	const struct akz_device *d = known_device(r, id);
	if(d == NULL) return;
	if(d->next_key){
		fail(r, "device '%s' already has a pending key (kid %s): commit it with commitKey first",
				id, akz_key_kid(d->next_key));
		return;
	}
	char cur_kid[AKZ_KID_LEN];
	snprintf(cur_kid, sizeof(cur_kid), "%s", akz_key_kid(d->key));
	/* By default the new key is of the kind of the current one. */
	enum akz_alg alg = akz_key_alg(d->key);
	int bits = alg == AKZ_ALG_RS256 ? EVP_PKEY_get_bits(akz_key_pkey(d->key)) : 0;
	if(bits != 3072 && bits != 4096) bits = 2048;
	/* ... and in the same store. */
	if(parse_keygen(r, cJSON_GetObjectItemCaseSensitive(r->cmd, "type"),
			cJSON_GetObjectItemCaseSensitive(r->cmd, "bits"), alg, bits, &ks)
			|| parse_store(r, cJSON_GetObjectItemCaseSensitive(r->cmd, "store"),
				akz_key_held(d->key) ? akz_key_store(d->key) : NULL, &ks)){
		return;
	}
	cJSON *root = open_tree(r);
	if(root == NULL) return;
	char *priv = NULL, *pub = NULL, *abs = NULL;
	struct akz_key *key = NULL;
	cJSON *o = tree_device(root, id, NULL);
	if(o == NULL){
		fail(r, "unknown device '%s'", id);
		goto out;
	}
	if(cJSON_GetObjectItemCaseSensitive(o, "next_key")){
		fail(r, "device '%s' already has a pending key in %s: commit it with commitKey first",
				id, r->p->cfg.devices_path);
		goto out;
	}
	key = make_key_files(r, id, ".next.pem", ".next.pub.pem", &ks, &priv, &pub);
	if(key == NULL) goto out;
	abs = absolute(priv);
	if(abs == NULL || !set_field(o, "next_key", cJSON_CreateString(abs))){
		nomem(r);
		goto out;
	}
	int rc = commit(r, root, id);
	root = NULL;
	if(rc) goto out;
	char *pem = akz_key_public_pem(key);
	cJSON *data = cJSON_CreateObject();
	if(pem == NULL || data == NULL || !cJSON_AddStringToObject(data, "id", id)
			|| !cJSON_AddStringToObject(data, "next_kid", akz_key_kid(key))
			|| !cJSON_AddStringToObject(data, "algorithm", akz_alg_name(akz_key_alg(key)))
			|| !cJSON_AddStringToObject(data, "public_key", pem)
			|| !cJSON_AddStringToObject(data, "key_file", priv)
			|| !cJSON_AddStringToObject(data, "public_key_file", pub)
			|| !cJSON_AddStringToObject(data, "kid", cur_kid)
			|| !cJSON_AddStringToObject(data, "note", "the current key stays in use: upload public_key to "
				"the device in akenza, then send commitKey")){
		cJSON_Delete(data);
		free(pem);
		nomem(r);
		free(priv);
		free(pub);
		priv = pub = NULL;
		goto out;
	}
	free(pem);
	add_certificate(data, key, id);
	reply(r, data, NULL);
	free(priv);
	free(pub);
	priv = pub = NULL;
out:
	unmake_key_files(priv, pub);
	akz_key_unref(key);
	free(abs);
	cJSON_Delete(root);
}

/* After commitKey pointed the registry at <id>.next.pem: moves the key to <id>.pem, so that the
 * key store keeps one layout and the next rotateKey finds <id>.next.pem free. The old <id>.pem
 * is kept as <id>.retired-<kid prefix>.pem. Every step leaves the registry naming files that
 * exist, so a crash anywhere is harmless. Returns the key's final path (caller frees), or NULL
 * if it stayed where it was (logged). */
static char *settle_key_files(struct req *r, const char *id, const char *old_kid)
{
	const struct akz_config *cfg = &r->p->cfg;
	char *res = NULL;
	char suffix[64], pubsuffix[64];
	snprintf(suffix, sizeof(suffix), ".retired-%.16s.pem", old_kid);
	snprintf(pubsuffix, sizeof(pubsuffix), ".retired-%.16s.pub.pem", old_kid);
	char *canon = akz_registry_keystore_path(cfg->devices_path, cfg->keystore_dir, id, ".pem");
	char *canonpub = akz_registry_keystore_path(cfg->devices_path, cfg->keystore_dir, id, ".pub.pem");
	char *next = akz_registry_keystore_path(cfg->devices_path, cfg->keystore_dir, id, ".next.pem");
	char *nextpub = akz_registry_keystore_path(cfg->devices_path, cfg->keystore_dir, id, ".next.pub.pem");
	char *ret = akz_registry_keystore_path(cfg->devices_path, cfg->keystore_dir, id, suffix);
	char *retpub = akz_registry_keystore_path(cfg->devices_path, cfg->keystore_dir, id, pubsuffix);
	char a[PATH_MAX], b[PATH_MAX];
	const struct akz_device *d = akz_registry_find_device(r->p->reg, id);
	if(!canon || !canonpub || !next || !nextpub || !ret || !retpub || d == NULL) goto out;
	/* Only the layout rotateKey made is moved: a key named elsewhere stays there. */
	if(realpath(d->key_uri, a) == NULL || realpath(next, b) == NULL || strcmp(a, b) != 0) goto out;
	/* Another device may name <id>.pem explicitly: then it is not ours to move. */
	if(realpath(canon, a)){
		for(size_t i = 0; i < akz_registry_device_count(r->p->reg); i++){
			const struct akz_device *o = akz_registry_device_at(r->p->reg, i);
			if((realpath(o->key_uri, b) && strcmp(a, b) == 0)
					|| (o->next_key_uri && realpath(o->next_key_uri, b) && strcmp(a, b) == 0)){
				goto out;
			}
		}
		if((link(canon, ret) != 0 && errno != EEXIST) || unlink(canon) != 0) goto out;
		if(link(canonpub, retpub) == 0 || errno == EEXIST) unlink(canonpub);
	}
	if(link(next, canon) != 0) goto out;
	if(link(nextpub, canonpub) != 0 && errno != ENOENT){
		mosquitto_log_printf(MOSQ_LOG_WARNING, "akenza: control: %s: %s", akz_esc(canonpub), strerror(errno));
	}
	akz_regfile_sync_dir(canon);
	char err[ERR_MAX];
	cJSON *root = akz_regfile_read(cfg->devices_path, err, sizeof(err));
	cJSON *o = root ? tree_device(root, id, NULL) : NULL;
	if(o == NULL){
		cJSON_Delete(root);
		goto out;
	}
	cJSON_DeleteItemFromObjectCaseSensitive(o, "key");
	if(save_tree(r, root, true)) goto out;
	unlink(next);
	unlink(nextpub);
	akz_regfile_sync_dir(canon);
	res = canon;
	canon = NULL;
out:
	if(res == NULL){
		mosquitto_log_printf(MOSQ_LOG_WARNING, "akenza: control: commitKey '%s': the key stays in its "
				"rotateKey file (the registry names it)", akz_esc(id));
	}
	free(canon);
	free(canonpub);
	free(next);
	free(nextpub);
	free(ret);
	free(retpub);
	return res;
}

static void cmd_commit_key(struct req *r)
{
	static const char *const known[] = {"id", NULL};
	const char *id;
	if(check_fields(r, known) || get_id(r, &id)) return;
	const struct akz_device *d = known_device(r, id);
	if(d == NULL) return;
	if(d->next_key == NULL){
		fail(r, "device '%s' has no pending key: make one with rotateKey", id);
		return;
	}
	char old_kid[AKZ_KID_LEN];
	snprintf(old_kid, sizeof(old_kid), "%s", akz_key_kid(d->key));
	cJSON *root = open_tree(r);
	if(root == NULL) return;
	cJSON *o = tree_device(root, id, NULL);
	const char *next = o ? obj_string(o, "next_key") : NULL;
	if(next == NULL){
		fail(r, "device '%s' has no pending key in %s", id, r->p->cfg.devices_path);
		cJSON_Delete(root);
		return;
	}
	/* Step one: the pending key becomes the key. The bridge sees a new kid and reconnects. */
	cJSON *v = cJSON_CreateString(next);
	cJSON_DeleteItemFromObjectCaseSensitive(o, "next_key");
	if(!set_field(o, "key", v)){
		nomem(r);
		cJSON_Delete(root);
		return;
	}
	if(save_tree(r, root, false)) return;
	done(r, id);
	/* Step two, best effort: tidy the key store. */
	char *final = settle_key_files(r, id, old_kid);
	cJSON *extra = cJSON_CreateObject();
	if(extra){
		cJSON_AddStringToObject(extra, "previous_kid", old_kid);
		if(final) cJSON_AddStringToObject(extra, "key_file", final);
		cJSON_AddStringToObject(extra, "note", "the bridge reconnects with the new key");
	}
	free(final);
	reply_device(r, id, extra);
}

static void cmd_reconnect_device(struct req *r)
{
	static const char *const known[] = {"id", NULL};
	const char *id;
	if(check_fields(r, known) || get_id(r, &id)) return;
	const struct akz_device *d = known_device(r, id);
	if(d == NULL) return;
	if(!d->enabled){
		fail(r, "device '%s' is disabled", id);
		return;
	}
	if(r->p->bridge == NULL){
		fail(r, "bridge off (plugin_opt_bridge false): nothing to reconnect");
		return;
	}
	if(akz_bridge_reconnect(r->p->bridge, id)){
		fail(r, "device '%s' is not in the bridge", id);
		return;
	}
	done(r, id);
	cJSON *data = cJSON_CreateObject();
	if(data == NULL || !cJSON_AddStringToObject(data, "id", id)){
		cJSON_Delete(data);
		nomem(r);
		return;
	}
	reply(r, data, NULL);
}

static void cmd_get_status(struct req *r)
{
	static const char *const known[] = {NULL};
	if(check_fields(r, known)) return;
	struct akz_status_summary s = {0};
	if(r->p->bridge) akz_bridge_summary(r->p->bridge, &s);
	size_t n = akz_registry_device_count(r->p->reg), enabled = 0;
	for(size_t i = 0; i < n; i++) enabled += akz_registry_device_at(r->p->reg, i)->enabled;
	/* The same totals as $SYS/broker/akenza/summary, with the registry's own device count. */
	cJSON *o = akz_status_summary_object(&s);
	if(o) cJSON_DeleteItemFromObject(o, "devices");
	if(o == NULL || !cJSON_AddStringToObject(o, "version", AKZ_VERSION)
			|| !cJSON_AddStringToObject(o, "bridge", r->p->bridge ? "on" : "off")
			|| !cJSON_AddNumberToObject(o, "devices", (double)n)
			|| !cJSON_AddNumberToObject(o, "enabled", (double)enabled)
			|| !cJSON_AddNumberToObject(o, "gateways", (double)akz_registry_gateway_count(r->p->reg))){
		cJSON_Delete(o);
		nomem(r);
		return;
	}
	reply(r, o, NULL);
}

/* ---- gateway commands ----------------------------------------------------------------------- */

static cJSON *gateway_data(struct req *r, const char *username)
{
	const struct akz_gateway *g = akz_registry_find_gateway(r->p->reg, username);
	cJSON *data = cJSON_CreateObject();
	cJSON *o = g ? describe_gateway(g) : NULL;
	if(data == NULL || o == NULL || !cJSON_AddItemToObject(data, "gateway", o)){
		cJSON_Delete(o);
		cJSON_Delete(data);
		return NULL;
	}
	return data;
}

/* Answers with the gateway as the registry in force has it. */
static void reply_gateway(struct req *r, const char *username)
{
	cJSON *data = gateway_data(r, username);
	if(data == NULL) nomem(r);
	else reply(r, data, NULL);
}

/* The "devices" field of a gateway: an array of known device ids or ["*"]. Returns a copy for
 * the tree, or NULL after answering. */
static cJSON *gateway_devices(struct req *r, cJSON *root, bool required)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(r->cmd, "devices");
	if(v == NULL){
		if(required) fail(r, "missing field 'devices': an array of device ids, or [\"*\"] for all");
		return NULL;
	}
	if(!cJSON_IsArray(v)){
		fail(r, "field 'devices' must be an array of device ids, or [\"*\"] for all");
		return NULL;
	}
	for(const cJSON *e = v->child; e; e = e->next){
		if(!cJSON_IsString(e)){
			fail(r, "field 'devices' must hold strings only");
			return NULL;
		}
		if(strcmp(e->valuestring, "*") != 0 && tree_device(root, e->valuestring, NULL) == NULL){
			fail(r, "unknown device '%s' in 'devices'", e->valuestring);
			return NULL;
		}
	}
	cJSON *copy = cJSON_Duplicate(v, true);
	if(copy == NULL) nomem(r);
	return copy;
}

static void cmd_list_gateways(struct req *r)
{
	static const char *const known[] = {NULL};
	if(check_fields(r, known)) return;
	cJSON *data = cJSON_CreateObject();
	cJSON *arr = data ? cJSON_AddArrayToObject(data, "gateways") : NULL;
	size_t n = akz_registry_gateway_count(r->p->reg);
	bool ok = arr != NULL;
	for(size_t i = 0; ok && i < n; i++){
		cJSON *o = describe_gateway(akz_registry_gateway_at(r->p->reg, i));
		ok = o && cJSON_AddItemToArray(arr, o);
		if(!ok) cJSON_Delete(o);
	}
	reply_list(r, data, ok, n);
}

static void cmd_get_gateway(struct req *r)
{
	static const char *const known[] = {"username", NULL};
	const char *u;
	if(check_fields(r, known) || get_string(r, "username", true, &u)) return;
	if(akz_registry_find_gateway(r->p->reg, u) == NULL){
		fail(r, "unknown gateway '%s'", u);
		return;
	}
	reply_gateway(r, u);
}

static void cmd_create_gateway(struct req *r)
{
	static const char *const known[] = {"username", "password", "devices", NULL};
	const char *u, *password;
	if(check_fields(r, known) || get_string(r, "username", true, &u)
			|| get_string(r, "password", true, &password) || check_username(r, u)){
		return;
	}
	cJSON *root = open_tree(r);
	if(root == NULL) return;
	char *hash = NULL;
	cJSON *devs = gateway_devices(r, root, true);
	if(devs == NULL) goto out;
	if(username_taken(root, u, NULL)){
		fail(r, "username '%s' is already used by a device or a gateway", u);
		goto out;
	}
	if((hash = hash_password(r, password)) == NULL) goto out;
	cJSON *gws = tree_array(root, "gateways");
	if(gws == NULL){
		if(cJSON_GetObjectItemCaseSensitive(root, "gateways")){
			fail(r, "%s: \"gateways\" is not an array", r->p->cfg.devices_path);
			goto out;
		}
		gws = cJSON_AddArrayToObject(root, "gateways");
	}
	cJSON *o = cJSON_CreateObject();
	if(gws == NULL || o == NULL || !cJSON_AddItemToArray(gws, o)){
		cJSON_Delete(o);
		nomem(r);
		goto out;
	}
	if(!cJSON_AddStringToObject(o, "username", u) || !cJSON_AddStringToObject(o, "password", hash)
			|| !cJSON_AddItemToObject(o, "devices", devs)){
		nomem(r);
		goto out;
	}
	devs = NULL;
	int rc = commit(r, root, u);
	root = NULL;
	if(rc) goto out;
	reply_gateway(r, u);
out:
	cJSON_Delete(devs);
	free(hash);
	cJSON_Delete(root);
}

static void cmd_modify_gateway(struct req *r)
{
	static const char *const known[] = {"username", "password", "devices", NULL};
	const char *u, *password;
	if(check_fields(r, known) || get_string(r, "username", true, &u)
			|| get_string(r, "password", false, &password)){
		return;
	}
	if(password == NULL && cJSON_GetObjectItemCaseSensitive(r->cmd, "devices") == NULL){
		fail(r, "nothing to change: give password or devices");
		return;
	}
	cJSON *root = open_tree(r);
	if(root == NULL) return;
	char *hash = NULL;
	cJSON *devs = NULL;
	cJSON *o = tree_gateway(root, u, NULL);
	if(o == NULL){
		fail(r, "unknown gateway '%s'", u);
		goto out;
	}
	if(cJSON_GetObjectItemCaseSensitive(r->cmd, "devices") && (devs = gateway_devices(r, root, true)) == NULL) goto out;
	if(password && (hash = hash_password(r, password)) == NULL) goto out;
	if((hash && !set_field(o, "password", cJSON_CreateString(hash)))){
		nomem(r);
		goto out;
	}
	if(devs){
		bool ok = set_field(o, "devices", devs);
		devs = NULL;
		if(!ok){
			nomem(r);
			goto out;
		}
	}
	int rc = commit(r, root, u);
	root = NULL;
	if(rc) goto out;
	reply_gateway(r, u);
out:
	cJSON_Delete(devs);
	free(hash);
	cJSON_Delete(root);
}

static void cmd_delete_gateway(struct req *r)
{
	static const char *const known[] = {"username", NULL};
	const char *u;
	if(check_fields(r, known) || get_string(r, "username", true, &u)) return;
	cJSON *root = open_tree(r);
	if(root == NULL) return;
	int index;
	if(tree_gateway(root, u, &index) == NULL){
		fail(r, "unknown gateway '%s'", u);
		cJSON_Delete(root);
		return;
	}
	cJSON_DeleteItemFromArray(tree_array(root, "gateways"), index);
	if(save_tree(r, root, false)) return;
	done(r, u);
	cJSON *data = cJSON_CreateObject();
	if(data == NULL || !cJSON_AddStringToObject(data, "username", u)){
		cJSON_Delete(data);
		nomem(r);
		return;
	}
	reply(r, data, NULL);
}

/* ---- dispatch ------------------------------------------------------------------------------ */

static const struct command {
	const char *name;
	void (*run)(struct req *r);
} commands[] = {
	{"listDevices", cmd_list_devices},
	{"getDevice", cmd_get_device},
	{"createDevice", cmd_create_device},
	{"modifyDevice", cmd_modify_device},
	{"enableDevice", cmd_enable_device},
	{"disableDevice", cmd_disable_device},
	{"deleteDevice", cmd_delete_device},
	{"rotateKey", cmd_rotate_key},
	{"commitKey", cmd_commit_key},
	{"reconnectDevice", cmd_reconnect_device},
	{"getStatus", cmd_get_status},
	{"listGateways", cmd_list_gateways},
	{"getGateway", cmd_get_gateway},
	{"createGateway", cmd_create_gateway},
	{"modifyGateway", cmd_modify_gateway},
	{"deleteGateway", cmd_delete_gateway},
};

/* Runs one element of "commands". */
static void run_command(struct req *r, const cJSON *cmd)
{
	r->cmd = cmd;
	r->command = "Unknown command";
	r->corr = NULL;
	if(!cJSON_IsObject(cmd)){
		fail(r, "command not an object");
		return;
	}
	const cJSON *corr = cJSON_GetObjectItemCaseSensitive(cmd, "correlationData");
	if(corr && !cJSON_IsString(corr)){
		fail(r, "correlationData must be a string");
		return;
	}
	r->corr = corr ? corr->valuestring : NULL;
	const cJSON *name = cJSON_GetObjectItemCaseSensitive(cmd, "command");
	if(!cJSON_IsString(name)){
		fail(r, "missing command (a string)");
		return;
	}
	r->command = name->valuestring;
	for(size_t i = 0; i < sizeof(commands)/sizeof(commands[0]); i++){
		if(strcmp(commands[i].name, name->valuestring) == 0){
			commands[i].run(r);
			return;
		}
	}
	fail(r, "unknown command");
}

/* Publishes the answers (taken). */
static void send_responses(cJSON *tree)
{
	char *payload = cJSON_PrintUnformatted(tree);
	cJSON_Delete(tree);
	if(payload == NULL){
		mosquitto_log_printf(MOSQ_LOG_ERR, "akenza: control: out of memory rendering an answer");
		return;
	}
	/* mosquitto_broker_publish takes payload; QoS 1 so that a subscriber at QoS 1 gets it
	 * reliably. Always the fixed topic: a client-chosen response topic would let a client
	 * publish where its ACL does not reach. */
	int rc = mosquitto_broker_publish(NULL, AKZ_CONTROL_RESPONSE_TOPIC, (int)strlen(payload), payload,
			1, false, NULL);
	if(rc != MOSQ_ERR_SUCCESS){
		mosquitto_log_printf(MOSQ_LOG_ERR, "akenza: control: cannot publish an answer: %s", mosquitto_strerror(rc));
	}
}

int akz_control_callback(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_control *ed = event_data;
	(void)event;

	const char *user = mosquitto_client_username(ed->client);
	const char *client = mosquitto_client_id(ed->client);
	char user_esc[300], client_esc[300];   /* for the log only */
	akz_escape(user_esc, sizeof(user_esc), user ? user : "(none)");
	akz_escape(client_esc, sizeof(client_esc), client ? client : "?");
	struct req r = {.p = userdata, .user = user_esc, .client = client_esc, .command = "Unknown command"};
	cJSON *tree = cJSON_CreateObject();
	r.responses = tree ? cJSON_AddArrayToObject(tree, "responses") : NULL;
	if(r.responses == NULL){
		cJSON_Delete(tree);
		mosquitto_log_printf(MOSQ_LOG_ERR, "akenza: control: out of memory");
		return MOSQ_ERR_SUCCESS;
	}
	if(ed->payloadlen > AKZ_CONTROL_MAX_PAYLOAD){
		fail(&r, "request larger than %d bytes", AKZ_CONTROL_MAX_PAYLOAD);
	}else if(ed->payload && akz_json_has_nul(ed->payload, ed->payloadlen)){
		/* cJSON would cut a string at the NUL without a word: "pw\u0000long-secret" would
		 * set the password "pw". */
		fail(&r, "the request holds a NUL character (raw or \\u0000)");
	}else{
		cJSON *req = ed->payload ? cJSON_ParseWithLength(ed->payload, ed->payloadlen) : NULL;
		const cJSON *cmds = req ? cJSON_GetObjectItemCaseSensitive(req, "commands") : NULL;
		if(req == NULL){
			fail(&r, "payload not valid JSON");
		}else if(!cJSON_IsArray(cmds)){
			fail(&r, "invalid or missing \"commands\" array");
		}else if(cmds->child == NULL){
			fail(&r, "empty \"commands\" array");
		}else{
			for(const cJSON *c = cmds->child; c; c = c->next) run_command(&r, c);
		}
		cJSON_Delete(req);
	}
	send_responses(tree);
	return MOSQ_ERR_SUCCESS;
}
