/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* registry.c - reading and checking the device registry (devices.json) and loading its keys. */
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <cJSON.h>
#include "akz_htab.h"
#include "akz_passwd.h"
#include "akz_registry.h"
#include "akz_util.h"

#define REGISTRY_MAX_BYTES (64L * 1024 * 1024)
#define ID_MAX 128
#define USERNAME_MAX 256

/* An index from a name to a position in an array: one hash table node per position. */
struct index {
	struct akz_htab tab;
	struct akz_htab_node *nodes;   /* nodes[i] is position i's */
};

/* What a key file looked like when it was loaded: if nothing of it changed, a reload may take
 * the loaded key over instead of parsing the file again (OpenSSL 3's decoders cost ~0.6 ms a key,
 * over a second for 2,000 devices, all of it on the broker thread). */
struct stamp {
	dev_t dev;
	ino_t ino;
	off_t size;
	mode_t mode;
	uid_t uid;
	struct timespec mtim, ctim;
	bool ok;
};

struct akz_registry {
	struct akz_device *devices;
	size_t ndevices;
	struct stamp *stamps;   /* two per device: key, next_key */
	struct akz_gateway *gateways;
	size_t ngateways;
	struct index by_id, by_username, gw_by_username;
};

/* What a load reports through; counts the problems. */
struct loader {
	const char *path;
	akz_report_fn report;
	void *ctx;
	int problems;
	const struct akz_registry *prev;   /* keys may be taken over from it, or NULL */
};

static void problem(struct loader *ld, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void problem(struct loader *ld, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;
	int n = snprintf(msg, sizeof(msg), "%s: ", ld->path);
	/* A registry path of 1022 bytes or more (PATH_MAX allows 4095) made n pass the end of msg,
	 * and the size below wrap around: vsnprintf then wrote past the stack buffer. Truncate. */
	if(n < 0 || (size_t)n >= sizeof(msg)) n = (int)sizeof(msg) - 1;
	va_start(ap, fmt);
	vsnprintf(msg + n, sizeof(msg) - (size_t)n, fmt, ap);
	va_end(ap);
	ld->problems++;
	if(ld->report) ld->report(ld->ctx, msg);
}

/* ---- index ---------------------------------------------------------------------------- */

typedef const char *(*key_fn)(const struct akz_registry *reg, size_t i);

static const char *device_id_at(const struct akz_registry *reg, size_t i) { return reg->devices[i].id; }
static const char *device_user_at(const struct akz_registry *reg, size_t i) { return reg->devices[i].username; }
static const char *gateway_user_at(const struct akz_registry *reg, size_t i) { return reg->gateways[i].username; }

/* Finds name in idx. Returns the position, or SIZE_MAX. */
static size_t index_find(const struct index *idx, const char *name)
{
	if(name == NULL) return SIZE_MAX;
	const struct akz_htab_node *n = akz_htab_find(&idx->tab, name, strlen(name));
	return n ? (size_t)(n - idx->nodes) : SIZE_MAX;
}

/* Builds idx over n entries (names already checked for duplicates; a duplicate would keep its
 * first position). Returns 0, or -1 when out of memory (index_free cleans up either way). */
static int index_build(const struct akz_registry *reg, struct index *idx, key_fn key, size_t n)
{
	idx->nodes = calloc(n ? n : 1, sizeof(*idx->nodes));
	if(idx->nodes == NULL || akz_htab_reserve(&idx->tab, n)) return -1;
	for(size_t i = 0; i < n; i++){
		const char *name = key(reg, i);
		/* Cannot fail: the table has room for n. */
		if(index_find(idx, name) == SIZE_MAX) (void)akz_htab_insert(&idx->tab, &idx->nodes[i], name, strlen(name));
	}
	return 0;
}

static void index_free(struct index *idx)
{
	akz_htab_free(&idx->tab);
	free(idx->nodes);
}

/* ---- field checks ---------------------------------------------------------------------- */

/* Why an id is not usable as an akenza device id and an MQTT topic level, or NULL. */
const char *akz_registry_bad_id_reason(const char *id)
{
	size_t n = strlen(id);
	if(n == 0) return "is empty";
	if(n > ID_MAX) return "is longer than 128 characters";
	if(strcmp(id, "*") == 0) return "is '*', which a gateway's \"devices\" takes for every device";
	if(strpbrk(id, "/+#")) return "contains '/', '+' or '#' (not allowed in a topic level)";
	return akz_text_bad_reason(id);
}

const char *akz_registry_bad_username_reason(const char *u)
{
	size_t n = strlen(u);
	if(n == 0) return "is empty";
	if(n > USERNAME_MAX) return "is longer than 256 bytes";
	return akz_text_bad_reason(u);
}

/* Takes a string field. Returns a copy (caller frees), NULL if absent (when optional) or bad. */
static char *take_string(struct loader *ld, const cJSON *obj, const char *name, const char *where,
		bool required, bool *bad)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, name);
	if(v == NULL){
		if(required){
			problem(ld, "%s.%s: missing", where, name);
			*bad = true;
		}
		return NULL;
	}
	if(!cJSON_IsString(v) || v->valuestring == NULL){
		problem(ld, "%s.%s: must be a string", where, name);
		*bad = true;
		return NULL;
	}
	char *s = strdup(v->valuestring);
	if(s == NULL){
		problem(ld, "%s.%s: out of memory", where, name);
		*bad = true;
	}
	return s;
}

static void check_known_fields(struct loader *ld, const cJSON *obj, const char *where,
		const char *const *known)
{
	for(const cJSON *f = obj->child; f; f = f->next){
		bool ok = false;
		for(const char *const *k = known; *k; k++) if(strcmp(f->string, *k) == 0) ok = true;
		if(!ok) problem(ld, "%s: unknown field '%s'", where, f->string);
	}
}

static void check_password(struct loader *ld, const char *hash, const char *where)
{
	struct akz_pw pw;
	char err[256];
	if(hash && akz_pw_parse(hash, &pw, err, sizeof(err))){
		problem(ld, "%s.password: %s", where, err);
	}
}

/* ---- key paths --------------------------------------------------------------------------- */

/* The directory part of path ("." if none) into out. */
static void dir_of(const char *path, char *out, size_t outlen)
{
	const char *slash = strrchr(path, '/');
	if(slash == NULL){
		snprintf(out, outlen, ".");
	}else if(slash == path){
		snprintf(out, outlen, "/");
	}else{
		snprintf(out, outlen, "%.*s", (int)(slash - path), path);
	}
}

/* The key store directory: <keystore> (relative ones against the registry's directory) or
 * keys/ beside the registry. Writes into out (size outlen). */
static void keystore_of(const char *regdir, const char *keystore, char *out, size_t outlen)
{
	if(keystore && keystore[0] == '/') snprintf(out, outlen, "%s", keystore);
	else if(keystore) snprintf(out, outlen, "%s/%s", regdir, keystore);
	else snprintf(out, outlen, "%s/keys", regdir);
}

/* The key location of a device: its "key" (a local file by its path, relative ones against the
 * registry's directory; a provider URI as it is) or <keystore>/<id>.pem. Returns a new string, or
 * NULL when out of memory. */
static char *resolve_key(const char *regdir, const char *keystore, const char *key, const char *id)
{
	char buf[PATH_MAX * 2], dir[PATH_MAX];
	const char *path;
	if(key){
		/* A local file is named by its path, whatever file: spelling the registry used. */
		enum akz_keyref kind = akz_keyref_parse(key, &path);
		if(kind != AKZ_KEYREF_PATH) snprintf(buf, sizeof(buf), "%s", key);
		else if(path[0] == '/') snprintf(buf, sizeof(buf), "%s", path);
		else snprintf(buf, sizeof(buf), "%s/%s", regdir, path);
	}else{
		keystore_of(regdir, keystore, dir, sizeof(dir));
		snprintf(buf, sizeof(buf), "%s/%s.pem", dir, id);
	}
	return strdup(buf);
}

char *akz_registry_keystore_path(const char *registry_path, const char *keystore_dir,
		const char *id, const char *suffix)
{
	char regdir[PATH_MAX], dir[PATH_MAX], buf[PATH_MAX];
	dir_of(registry_path, regdir, sizeof(regdir));
	keystore_of(regdir, keystore_dir, dir, sizeof(dir));
	if(snprintf(buf, sizeof(buf), "%s/%s%s", dir, id, suffix) >= (int)sizeof(buf)) return NULL;
	return strdup(buf);
}

char *akz_registry_resolve_key(const char *registry_path, const char *key)
{
	char regdir[PATH_MAX];
	dir_of(registry_path, regdir, sizeof(regdir));
	return resolve_key(regdir, NULL, key, "");
}

/* ---- parsing ------------------------------------------------------------------------------ */

static void free_device(struct akz_device *d)
{
	free(d->id);
	free(d->username);
	free(d->password);
	free(d->key_uri);
	free(d->next_key_uri);
	akz_key_unref(d->key);
	akz_key_unref(d->next_key);
}

static void free_gateway(struct akz_gateway *g)
{
	free(g->username);
	free(g->password);
	for(size_t i = 0; i < g->ndevices; i++) free(g->devices[i]);
	free(g->devices);
}

void akz_registry_free(struct akz_registry *reg)
{
	if(reg == NULL) return;
	for(size_t i = 0; i < reg->ndevices; i++) free_device(&reg->devices[i]);
	for(size_t i = 0; i < reg->ngateways; i++) free_gateway(&reg->gateways[i]);
	free(reg->devices);
	free(reg->stamps);
	free(reg->gateways);
	index_free(&reg->by_id);
	index_free(&reg->by_username);
	index_free(&reg->gw_by_username);
	free(reg);
}

static bool same_stamp(const struct stamp *a, const struct stamp *b)
{
	return a->ok && b->ok && a->dev == b->dev && a->ino == b->ino && a->size == b->size
			&& a->mode == b->mode && a->uid == b->uid
			&& a->mtim.tv_sec == b->mtim.tv_sec && a->mtim.tv_nsec == b->mtim.tv_nsec
			&& a->ctim.tv_sec == b->ctim.tv_sec && a->ctim.tv_nsec == b->ctim.tv_nsec;
}

/* The key the previous registry loaded from the same file, if that file is unchanged (same
 * inode, size, owner, mode, mtime and ctime: a chmod or a rewrite shows in ctime). Only the same
 * device's key or pending key is considered (commitKey turns one into the other), which keeps the
 * lookup O(1). NULL if there is none. */
static struct akz_key *reusable_key(const struct akz_registry *prev, const char *id, const char *uri,
		const struct stamp *st)
{
	size_t i = prev ? index_find(&prev->by_id, id) : SIZE_MAX;
	if(i == SIZE_MAX || prev->stamps == NULL) return NULL;
	const struct akz_device *d = &prev->devices[i];
	if(d->key && d->key_uri && strcmp(d->key_uri, uri) == 0 && same_stamp(&prev->stamps[2*i], st)) return d->key;
	if(d->next_key && d->next_key_uri && strcmp(d->next_key_uri, uri) == 0
			&& same_stamp(&prev->stamps[2*i + 1], st)){
		return d->next_key;
	}
	return NULL;
}

/* Loads the key at uri for device id, or takes it over from the previous registry. Records the
 * file's stamp in st (not ok for OSSL_STORE URIs, which are always loaded). As akz_key_load. */
static int load_key(struct loader *ld, const char *id, const char *uri, const struct akz_key_opts *kopts,
		struct akz_key **out, struct stamp *st, char *err, size_t errlen)
{
	struct stat sb;
	memset(st, 0, sizeof(*st));
	const char *path;
	if(akz_keyref_parse(uri, &path) == AKZ_KEYREF_PATH && stat(path, &sb) == 0 && S_ISREG(sb.st_mode)){
		*st = (struct stamp){.dev = sb.st_dev, .ino = sb.st_ino, .size = sb.st_size, .mode = sb.st_mode,
			.uid = sb.st_uid, .mtim = sb.st_mtim, .ctim = sb.st_ctim, .ok = true};
		struct akz_key *k = reusable_key(ld->prev, id, uri, st);
		if(k){
			*out = akz_key_ref(k);
			return 0;
		}
	}
	return akz_key_load(uri, kopts, out, err, errlen);
}

static void parse_device(struct loader *ld, const cJSON *o, size_t i, struct akz_device *d,
		struct stamp st[2], const char *regdir, const char *keystore, const struct akz_key_opts *kopts)
{
	static const char *const known[] = {"id", "username", "password", "key", "next_key", "enabled", "name",
		"description", NULL};
	char where[48];
	bool bad = false;

	snprintf(where, sizeof(where), "devices[%zu]", i);
	if(!cJSON_IsObject(o)){
		problem(ld, "%s: must be an object", where);
		return;
	}
	check_known_fields(ld, o, where, known);
	d->id = take_string(ld, o, "id", where, true, &bad);
	d->username = take_string(ld, o, "username", where, false, &bad);
	d->password = take_string(ld, o, "password", where, true, &bad);
	char *key = take_string(ld, o, "key", where, false, &bad);
	char *next = take_string(ld, o, "next_key", where, false, &bad);
	const cJSON *en = cJSON_GetObjectItemCaseSensitive(o, "enabled");
	d->enabled = true;
	if(en && !cJSON_IsBool(en)) problem(ld, "%s.enabled: must be true or false", where);
	else if(en) d->enabled = cJSON_IsTrue(en);

	const char *why;
	if(d->id && (why = akz_registry_bad_id_reason(d->id)) != NULL){
		problem(ld, "%s.id: '%s' %s", where, d->id, why);
		bad = true;
	}
	if(d->username == NULL && d->id) d->username = strdup(d->id);
	if(d->username && (why = akz_registry_bad_username_reason(d->username)) != NULL){
		problem(ld, "%s.username: '%s' %s", where, d->username, why);
	}
	check_password(ld, d->password, where);
	if(d->id && !bad){
		d->key_uri = resolve_key(regdir, keystore, key, d->id);
		char err[768];
		if(d->key_uri == NULL){
			problem(ld, "%s: out of memory", where);
		}else if(load_key(ld, d->id, d->key_uri, kopts, &d->key, &st[0], err, sizeof(err))){
			problem(ld, "%s (id '%s'): key: %s", where, d->id, err);
		}
		/* A pending key (rotateKey) is checked like the key in use: committing it must not
		 * be the first time anyone finds out it does not load. */
		if(next){
			d->next_key_uri = resolve_key(regdir, keystore, next, d->id);
			if(d->next_key_uri == NULL){
				problem(ld, "%s: out of memory", where);
			}else if(load_key(ld, d->id, d->next_key_uri, kopts, &d->next_key, &st[1], err, sizeof(err))){
				problem(ld, "%s (id '%s'): next_key: %s", where, d->id, err);
			}
		}
	}
	free(key);
	free(next);
}

static void parse_gateway(struct loader *ld, const cJSON *o, size_t i, struct akz_gateway *g)
{
	static const char *const known[] = {"username", "password", "devices", "name", "description", NULL};
	char where[48];
	bool bad = false;

	snprintf(where, sizeof(where), "gateways[%zu]", i);
	if(!cJSON_IsObject(o)){
		problem(ld, "%s: must be an object", where);
		return;
	}
	check_known_fields(ld, o, where, known);
	g->username = take_string(ld, o, "username", where, true, &bad);
	g->password = take_string(ld, o, "password", where, true, &bad);
	const char *why;
	if(g->username && (why = akz_registry_bad_username_reason(g->username)) != NULL){
		problem(ld, "%s.username: '%s' %s", where, g->username, why);
	}
	check_password(ld, g->password, where);
	const cJSON *devs = cJSON_GetObjectItemCaseSensitive(o, "devices");
	if(!cJSON_IsArray(devs)){
		problem(ld, "%s.devices: must be an array of device ids (or [\"*\"])", where);
		return;
	}
	size_t n = (size_t)cJSON_GetArraySize(devs);
	g->devices = calloc(n ? n : 1, sizeof(char *));
	if(g->devices == NULL){
		problem(ld, "%s: out of memory", where);
		return;
	}
	size_t k = 0;
	for(const cJSON *v = devs->child; v; v = v->next, k++){
		if(!cJSON_IsString(v)){
			problem(ld, "%s.devices[%zu]: must be a string", where, k);
			continue;
		}
		if(strcmp(v->valuestring, "*") == 0){
			g->all_devices = true;
			continue;
		}
		g->devices[g->ndevices] = strdup(v->valuestring);
		if(g->devices[g->ndevices] == NULL) problem(ld, "%s: out of memory", where);
		else g->ndevices++;
	}
}

/* Reports every name that appears twice among devices' ids, devices' and gateways' usernames. */
static void check_duplicates(struct loader *ld, const struct akz_registry *reg)
{
	for(size_t i = 0; i < reg->ndevices; i++){
		const struct akz_device *d = &reg->devices[i];
		for(size_t j = 0; j < i && d->id; j++){
			if(reg->devices[j].id && strcmp(reg->devices[j].id, d->id) == 0){
				problem(ld, "devices[%zu].id: duplicate id '%s' (first at devices[%zu])", i, d->id, j);
				break;
			}
		}
	}
	/* Usernames: devices first, then gateways, in one numbering so that one loop serves both. */
	size_t total = reg->ndevices + reg->ngateways;
	for(size_t i = 0; i < total; i++){
		const char *u = i < reg->ndevices ? reg->devices[i].username : reg->gateways[i - reg->ndevices].username;
		for(size_t j = 0; j < i && u; j++){
			const char *v = j < reg->ndevices ? reg->devices[j].username : reg->gateways[j - reg->ndevices].username;
			if(v && strcmp(u, v) == 0){
				problem(ld, "%s[%zu].username: duplicate username '%s' (first at %s[%zu])",
						i < reg->ndevices ? "devices" : "gateways", i < reg->ndevices ? i : i - reg->ndevices, u,
						j < reg->ndevices ? "devices" : "gateways", j < reg->ndevices ? j : j - reg->ndevices);
				break;
			}
		}
	}
}

/* Reads the whole file. Returns a NUL-terminated buffer (caller frees), or NULL after reporting. */
static char *read_file(struct loader *ld)
{
	FILE *f = fopen(ld->path, "rb");
	if(f == NULL){
		problem(ld, "cannot open: %s", strerror(errno));
		return NULL;
	}
	struct stat sb;
	if(fstat(fileno(f), &sb) != 0 || !S_ISREG(sb.st_mode)){
		problem(ld, "not a regular file");
		fclose(f);
		return NULL;
	}
	if(sb.st_size > REGISTRY_MAX_BYTES){
		problem(ld, "larger than %ld MiB", REGISTRY_MAX_BYTES / (1024L * 1024L));
		fclose(f);
		return NULL;
	}
	char *buf = malloc((size_t)sb.st_size + 1);
	size_t n = buf ? fread(buf, 1, (size_t)sb.st_size, f) : 0;
	if(buf == NULL || ferror(f)){
		problem(ld, buf ? "read error: %s" : "out of memory%s", buf ? strerror(errno) : "");
		free(buf);
		fclose(f);
		return NULL;
	}
	fclose(f);
	buf[n] = '\0';
	if(akz_json_has_nul(buf, n)){
		problem(ld, "holds a NUL character (raw or \\u0000): it would cut a string short");
		free(buf);
		return NULL;
	}
	return buf;
}

/* Reports a JSON syntax error with its line and column. */
static void report_syntax(struct loader *ld, const char *text, const char *at)
{
	int line = 1, col = 1;
	for(const char *p = text; at && p < at && *p; p++){
		if(*p == '\n'){
			line++;
			col = 1;
		}else{
			col++;
		}
	}
	problem(ld, "line %d, column %d: JSON syntax error", line, col);
}

static int parse_all(struct loader *ld, const cJSON *root, struct akz_registry *reg,
		const char *keystore, const struct akz_key_opts *kopts)
{
	char regdir[PATH_MAX];
	dir_of(ld->path, regdir, sizeof(regdir));
	if(!cJSON_IsObject(root)){
		problem(ld, "the top level must be an object with \"devices\" (and \"gateways\")");
		return -1;
	}
	static const char *const known[] = {"devices", "gateways", NULL};
	check_known_fields(ld, root, "top level", known);
	const cJSON *devs = cJSON_GetObjectItemCaseSensitive(root, "devices");
	const cJSON *gws = cJSON_GetObjectItemCaseSensitive(root, "gateways");
	if(!cJSON_IsArray(devs)){
		problem(ld, "devices: %s", devs ? "must be an array" : "missing");
		return -1;
	}
	if(gws && !cJSON_IsArray(gws)){
		problem(ld, "gateways: must be an array");
		return -1;
	}
	size_t nd = (size_t)cJSON_GetArraySize(devs), ng = gws ? (size_t)cJSON_GetArraySize(gws) : 0;
	reg->devices = calloc(nd ? nd : 1, sizeof(*reg->devices));
	reg->gateways = calloc(ng ? ng : 1, sizeof(*reg->gateways));
	reg->stamps = calloc(nd ? nd * 2 : 2, sizeof(*reg->stamps));
	if(reg->devices == NULL || reg->gateways == NULL || reg->stamps == NULL){
		problem(ld, "out of memory");
		return -1;
	}
	size_t i = 0;
	for(const cJSON *o = devs->child; o; o = o->next, i++){
		parse_device(ld, o, i, &reg->devices[i], &reg->stamps[2*i], regdir, keystore, kopts);
		reg->ndevices = i + 1;
	}
	i = 0;
	for(const cJSON *o = gws ? gws->child : NULL; o; o = o->next, i++){
		parse_gateway(ld, o, i, &reg->gateways[i]);
		reg->ngateways = i + 1;
	}
	check_duplicates(ld, reg);
	return 0;
}

/* Builds the indexes and checks that gateways name known devices. */
static void index_all(struct loader *ld, struct akz_registry *reg)
{
	if(index_build(reg, &reg->by_id, device_id_at, reg->ndevices)
			|| index_build(reg, &reg->by_username, device_user_at, reg->ndevices)
			|| index_build(reg, &reg->gw_by_username, gateway_user_at, reg->ngateways)){
		problem(ld, "out of memory");
		return;
	}
	for(size_t i = 0; i < reg->ngateways; i++){
		const struct akz_gateway *g = &reg->gateways[i];
		for(size_t k = 0; k < g->ndevices; k++){
			if(akz_registry_find_device(reg, g->devices[k]) == NULL){
				problem(ld, "gateways[%zu].devices[%zu]: unknown device '%s'", i, k, g->devices[k]);
			}
		}
	}
}

int akz_registry_load(const char *path, const char *keystore_dir, const struct akz_key_opts *kopts,
		akz_report_fn report, void *report_ctx, struct akz_registry **out)
{
	return akz_registry_reload(path, keystore_dir, kopts, NULL, report, report_ctx, out);
}

int akz_registry_reload(const char *path, const char *keystore_dir, const struct akz_key_opts *kopts,
		const struct akz_registry *prev, akz_report_fn report, void *report_ctx, struct akz_registry **out)
{
	struct loader ld = {.path = path, .report = report, .ctx = report_ctx, .prev = prev};
	*out = NULL;
	char *text = read_file(&ld);
	if(text == NULL) return -1;
	const char *end = NULL;
	cJSON *root = cJSON_ParseWithOpts(text, &end, true);
	if(root == NULL){
		report_syntax(&ld, text, end ? end : cJSON_GetErrorPtr());
		free(text);
		return -1;
	}
	struct akz_registry *reg = calloc(1, sizeof(*reg));
	if(reg == NULL){
		problem(&ld, "out of memory");
	}else if(parse_all(&ld, root, reg, keystore_dir, kopts) == 0 && ld.problems == 0){
		index_all(&ld, reg);
	}
	cJSON_Delete(root);
	free(text);
	if(ld.problems){
		akz_registry_free(reg);
		return -1;
	}
	*out = reg;
	return 0;
}

size_t akz_registry_device_count(const struct akz_registry *reg) { return reg ? reg->ndevices : 0; }
size_t akz_registry_gateway_count(const struct akz_registry *reg) { return reg ? reg->ngateways : 0; }

const struct akz_device *akz_registry_device_at(const struct akz_registry *reg, size_t i)
{
	return i < reg->ndevices ? &reg->devices[i] : NULL;
}

const struct akz_gateway *akz_registry_gateway_at(const struct akz_registry *reg, size_t i)
{
	return i < reg->ngateways ? &reg->gateways[i] : NULL;
}

const struct akz_device *akz_registry_find_device(const struct akz_registry *reg, const char *id)
{
	size_t i = reg ? index_find(&reg->by_id, id) : SIZE_MAX;
	return i == SIZE_MAX ? NULL : &reg->devices[i];
}

const struct akz_device *akz_registry_find_device_by_username(const struct akz_registry *reg,
		const char *username)
{
	size_t i = reg ? index_find(&reg->by_username, username) : SIZE_MAX;
	return i == SIZE_MAX ? NULL : &reg->devices[i];
}

const struct akz_gateway *akz_registry_find_gateway(const struct akz_registry *reg, const char *username)
{
	size_t i = reg ? index_find(&reg->gw_by_username, username) : SIZE_MAX;
	return i == SIZE_MAX ? NULL : &reg->gateways[i];
}

bool akz_gateway_serves(const struct akz_gateway *gw, const char *id)
{
	if(gw->all_devices) return true;
	for(size_t i = 0; i < gw->ndevices; i++) if(strcmp(gw->devices[i], id) == 0) return true;
	return false;
}

void akz_registry_weak_hashes(const struct akz_registry *reg, const char *path, akz_report_fn report, void *ctx)
{
	char names[600] = "";
	size_t used = 0, n = 0;
	size_t nd = akz_registry_device_count(reg), ng = akz_registry_gateway_count(reg);
	for(size_t i = 0; i < nd + ng; i++){
		const char *user = i < nd ? reg->devices[i].username : reg->gateways[i - nd].username;
		const char *hash = i < nd ? reg->devices[i].password : reg->gateways[i - nd].password;
		struct akz_pw pw;
		char err[8];
		if(akz_pw_parse(hash, &pw, err, sizeof(err)) != 0) continue;
		if(pw.kind == AKZ_PW_PBKDF2 && pw.iterations >= AKZ_PW_ITERATIONS_WEAK) continue;
		/* The first names that fit; the count says how many there are. */
		if(used < sizeof(names) - 64){
			int k = snprintf(names + used, sizeof(names) - used, "%s'%s'", n ? ", " : "", user);
			if(k > 0) used += (size_t)k < sizeof(names) - used ? (size_t)k : sizeof(names) - used - 1;
		}
		n++;
	}
	if(n == 0 || report == NULL) return;
	char msg[1024];
	snprintf(msg, sizeof(msg), "%s: %zu user%s with a weak password hash ($6$, or $7$ with fewer than %d "
			"iterations; cheap to guess from a copy of the registry): %s%s; make new hashes with "
			"akenzactl passwd", path, n, n == 1 ? "" : "s", AKZ_PW_ITERATIONS_WEAK, names,
			used >= sizeof(names) - 64 ? ", ..." : "");
	report(ctx, msg);
}
