/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* cmd_import.c - akenzactl akenza import: a fleet from a CSV file (deviceId, username, password,
 * key type) into the registry file or a running broker, keys made, all rows or none. */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cJSON.h>
#include <openssl/crypto.h>
#include "akenzactl.h"
#include "akz_keystore.h"
#include "akz_passwd.h"
#include "akz_regfile.h"
#include "akz_registry.h"
#include "akz_x509.h"
#include "fleet.h"

#define CSV_MAX (64L << 20)
#define FIELD_MAX 1024

/* One row of the file. */
struct row {
	int line;
	char *id, *username, *password;   /* username NULL: the id */
	enum akz_alg alg;
	int bits;
	const char *type;                  /* "ec" or "rsa", for the control API */
};

struct rows {
	struct row *v;
	size_t n, cap;
	int errors;
	const char *file;
};

static void row_error(struct rows *rs, int line, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Prints "FILE:LINE: message" and counts it. */
static void row_error(struct rows *rs, int line, const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "akenzactl: %s:%d: ", rs->file, line);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	rs->errors++;
}

static void free_rows(struct rows *rs)
{
	for(size_t i = 0; i < rs->n; i++){
		free(rs->v[i].id);
		free(rs->v[i].username);
		if(rs->v[i].password){
			OPENSSL_cleanse(rs->v[i].password, strlen(rs->v[i].password));
			free(rs->v[i].password);
		}
	}
	free(rs->v);
	memset(rs, 0, sizeof(*rs));
}

/* Splits one line into at most 8 fields (RFC 4180 quoting: "a ""b"", c" is one field; spaces around
 * an unquoted field are dropped). Returns the number of fields, or -1 with a reason in why. Each
 * field is a new string in f[] (caller frees, also on failure). */
static int split_csv(const char *line, char *f[8], const char **why)
{
	int n = 0;
	const char *p = line;
	for(;;){
		char buf[FIELD_MAX + 1];
		size_t len = 0;
		while(*p == ' ' || *p == '\t') p++;
		if(*p == '"'){
			for(p++;; p++){
				if(*p == '\0'){
					*why = "a quoted field is not closed";
					return -1;
				}
				if(*p == '"' && p[1] == '"') p++;
				else if(*p == '"') break;
				if(len == FIELD_MAX){
					*why = "a field is longer than 1024 bytes";
					return -1;
				}
				buf[len++] = *p;
			}
			p++;
			while(*p == ' ' || *p == '\t') p++;
			if(*p != ',' && *p != '\0'){
				*why = "text after a quoted field's closing quote";
				return -1;
			}
		}else{
			const char *end = p + strcspn(p, ",");
			const char *e = end;
			while(e > p && (e[-1] == ' ' || e[-1] == '\t')) e--;
			if((size_t)(e - p) > FIELD_MAX){
				*why = "a field is longer than 1024 bytes";
				return -1;
			}
			len = (size_t)(e - p);
			memcpy(buf, p, len);
			p = end;
		}
		buf[len] = '\0';
		if(n == 8){
			*why = "more than 4 fields";
			return -1;
		}
		if((f[n++] = strdup(buf)) == NULL){
			*why = "out of memory";
			return -1;
		}
		if(*p != ',') return n;
		p++;
	}
}

/* Parses a key type: ec, rsa (2048 bits), rsa:3072, rsa:4096. Returns 0 or -1. */
static int parse_type(const char *s, struct row *r)
{
	r->bits = 2048;
	if(strcmp(s, "ec") == 0){
		r->alg = AKZ_ALG_ES256;
		r->type = "ec";
		r->bits = 0;
		return 0;
	}
	r->alg = AKZ_ALG_RS256;
	r->type = "rsa";
	if(strcmp(s, "rsa") == 0 || strcmp(s, "rsa:2048") == 0) return 0;
	if(strcmp(s, "rsa:3072") == 0){
		r->bits = 3072;
		return 0;
	}
	if(strcmp(s, "rsa:4096") == 0){
		r->bits = 4096;
		return 0;
	}
	return -1;
}

/* Why a local username (empty: the deviceId) cannot be used, as the control API judges it; NULL if it can. */
static const char *bad_username(const char *u)
{
	for(const unsigned char *q = (const unsigned char *)u; *q;){
		if(*q < 0x20 || *q == 0x7F) return "contains a control character";
		int len = *q < 0x80 ? 1 : (*q >> 5) == 6 ? 2 : (*q >> 4) == 14 ? 3 : (*q >> 3) == 30 ? 4 : 0;
		for(int k = 1; k < len; k++) if((q[k] & 0xC0) != 0x80) len = 0;
		if(len == 0) return "is not valid UTF-8";
		q += len;
	}
	return NULL;
}

/* Checks one split line and appends it as a row. Problems are printed and counted. */
static void take_row(struct rows *rs, int line, char **f, int nf)
{
	if(nf != 4){
		row_error(rs, line, "%d field%s: a row is deviceId,username,password,key type (username may be empty)",
				nf, nf == 1 ? "" : "s");
		return;
	}
	struct row r = {.line = line};
	const char *why = akz_registry_bad_id_reason(f[0]);
	bool ok = true;
	if(why){
		row_error(rs, line, "deviceId '%s' %s", f[0], why);
		ok = false;
	}
	why = bad_username(f[1]);
	if(why){
		row_error(rs, line, "username: %s", why);
		ok = false;
	}
	if(f[2][0] == '\0'){
		row_error(rs, line, "password: empty");
		ok = false;
	}
	if(parse_type(f[3], &r)){
		row_error(rs, line, "key type '%s' is not ec, rsa, rsa:3072 or rsa:4096", f[3]);
		ok = false;
	}
	if(!ok) return;
	if(rs->n == rs->cap){
		size_t cap = rs->cap ? rs->cap * 2 : 64;
		struct row *v = realloc(rs->v, cap * sizeof(*v));
		if(v == NULL){
			row_error(rs, line, "out of memory");
			return;
		}
		rs->v = v;
		rs->cap = cap;
	}
	r.id = f[0];
	r.username = f[1][0] ? f[1] : NULL;
	r.password = f[2];
	f[0] = f[2] = NULL;
	if(r.username) f[1] = NULL;
	rs->v[rs->n++] = r;
}

/* Reads and checks the whole file. Returns 0 (rows in rs), or -1 after printing every problem. */
static int read_csv(const char *path, struct rows *rs)
{
	rs->file = path;
	FILE *fp = fopen(path, "r");
	if(fp == NULL){
		ctl_error("%s: %s", path, strerror(errno));
		return -1;
	}
	char *line = NULL;
	size_t cap = 0;
	ssize_t len;
	int no = 0;
	bool first = true;
	long total = 0;
	while((len = getline(&line, &cap, fp)) >= 0){
		no++;
		total += len;
		if(total > CSV_MAX){
			row_error(rs, no, "the file is larger than 64 MiB");
			break;
		}
		line[strcspn(line, "\r\n")] = '\0';
		const char *p = line + strspn(line, " \t");
		if(*p == '\0' || *p == '#') continue;
		char *f[8] = {0};
		const char *why = NULL;
		int nf = split_csv(line, f, &why);
		if(nf < 0){
			row_error(rs, no, "%s", why);
		}else if(first && strcasecmp(f[0], "deviceId") == 0){
			/* a header line */
		}else{
			take_row(rs, no, f, nf);
		}
		first = false;
		for(int i = 0; i < 8; i++){
			if(f[i]){
				OPENSSL_cleanse(f[i], strlen(f[i]));
				free(f[i]);
			}
		}
	}
	if(line){
		OPENSSL_cleanse(line, cap);
		free(line);
	}
	fclose(fp);
	if(rs->errors == 0 && rs->n == 0) row_error(rs, no, "no devices in the file");
	return rs->errors ? -1 : 0;
}

/* Reports names used twice: a row's id or username against the other rows, and against taken (the
 * ids and usernames of the registry or the broker: a JSON array of strings). Returns the count. */
static int check_names(struct rows *rs, const cJSON *taken)
{
	int before = rs->errors;
	for(size_t i = 0; i < rs->n; i++){
		const struct row *r = &rs->v[i];
		const char *user = r->username ? r->username : r->id;
		for(const cJSON *t = taken ? taken->child : NULL; t; t = t->next){
			if(strcmp(t->valuestring, r->id) == 0) row_error(rs, r->line, "deviceId '%s' exists already", r->id);
			else if(strcmp(t->valuestring, user) == 0) row_error(rs, r->line, "username '%s' is taken already", user);
		}
		for(size_t j = 0; j < i; j++){
			const struct row *q = &rs->v[j];
			const char *quser = q->username ? q->username : q->id;
			if(strcmp(q->id, r->id) == 0) row_error(rs, r->line, "deviceId '%s' again (line %d)", r->id, q->line);
			else if(strcmp(quser, user) == 0 || strcmp(q->id, user) == 0 || strcmp(quser, r->id) == 0){
				row_error(rs, r->line, "username or deviceId '%s' clashes with line %d", user, q->line);
			}
		}
	}
	return rs->errors - before;
}

/* Adds s to the array of taken names. Returns false when out of memory. */
static bool take_name(cJSON *taken, const char *s)
{
	return s == NULL || cJSON_AddItemToArray(taken, cJSON_CreateString(s));
}

/* ---- into a registry file ----------------------------------------------------------------------- */

/* The names a registry tree uses: device ids and usernames, gateway usernames. NULL when out of memory. */
static cJSON *registry_names(const cJSON *root)
{
	cJSON *taken = cJSON_CreateArray();
	static const char *const lists[2] = {"devices", "gateways"};
	for(int l = 0; taken && l < 2; l++){
		const cJSON *arr = cJSON_GetObjectItemCaseSensitive(root, lists[l]);
		for(const cJSON *e = cJSON_IsArray(arr) ? arr->child : NULL; e; e = e->next){
			const cJSON *id = cJSON_GetObjectItemCaseSensitive(e, "id");
			const cJSON *user = cJSON_GetObjectItemCaseSensitive(e, "username");
			if(!take_name(taken, cJSON_IsString(id) ? id->valuestring : NULL)
					|| !take_name(taken, cJSON_IsString(user) ? user->valuestring : NULL)){
				cJSON_Delete(taken);
				return NULL;
			}
		}
	}
	return taken;
}

static void print_problem(void *ctx, const char *msg)
{
	(void)ctx;
	fprintf(stderr, "akenzactl: %s\n", msg);
}

/* Removes the key files written so far (rows [0, n)) and, if made here, the key store. */
static void unwrite_keys(const char *path, const char *keystore, const struct rows *rs, size_t n, const char *made_dir)
{
	static const char *const suffixes[2] = {".pem", ".pub.pem"};
	for(size_t i = 0; i < n; i++){
		for(int s = 0; s < 2; s++){
			char *f = akz_registry_keystore_path(path, keystore, rs->v[i].id, suffixes[s]);
			if(f) unlink(f);
			free(f);
		}
	}
	if(made_dir) rmdir(made_dir);
}

/* Makes row r's key pair in the key store and its registry entry (password hashed) in devs.
 * Returns 0, or -1 after printing why. */
static int make_row(const char *path, const char *keystore, const struct row *r, int iterations, cJSON *devs,
		const char *file)
{
	char err[1024];
	char *priv = akz_registry_keystore_path(path, keystore, r->id, ".pem");
	char *pub = akz_registry_keystore_path(path, keystore, r->id, ".pub.pem");
	struct akz_key *key = NULL;
	char *hash = NULL;
	int rc = -1;
	cJSON *o = cJSON_CreateObject();
	if(priv == NULL || pub == NULL || o == NULL){
		ctl_error("%s:%d: key path too long or out of memory", file, r->line);
	}else if(akz_key_generate(r->alg, r->bits, &key, err, sizeof(err)) || akz_key_write(key, priv, pub, err, sizeof(err))){
		/* akz_key_write may have written the private key before it found the public one in the way. */
		if(strstr(err, pub)) unlink(priv);
		ctl_error("%s:%d: %s", file, r->line, err);
	}else if((hash = akz_pw_hash(r->password, iterations, err, sizeof(err))) == NULL){
		ctl_error("%s:%d: password: %s", file, r->line, err);
	}else if(cJSON_AddStringToObject(o, "id", r->id) && (r->username == NULL || cJSON_AddStringToObject(o, "username", r->username))
			&& cJSON_AddStringToObject(o, "password", hash) && cJSON_AddBoolToObject(o, "enabled", true)
			&& cJSON_AddItemToArray(devs, o)){
		o = NULL;
		rc = 0;
	}else{
		ctl_error("out of memory");
	}
	cJSON_Delete(o);
	free(hash);
	akz_key_unref(key);
	free(priv);
	free(pub);
	return rc;
}

/* Imports rs into the registry file at path: every row or none. Returns 0, or 1 after printing why
 * (nothing changed then). */
static int import_to_file(const char *path, const char *keystore, int iterations, struct rows *rs, bool dry_run,
		const struct akz_key_opts *ko)
{
	char err[1024];
	cJSON *root;
	struct stat sb;
	if(stat(path, &sb) == 0){
		if((root = akz_regfile_read(path, err, sizeof(err))) == NULL){
			ctl_error("%s", err);
			return 1;
		}
	}else if(errno == ENOENT){
		root = cJSON_Parse("{\"devices\":[],\"gateways\":[]}");
	}else{
		ctl_error("%s: %s", path, strerror(errno));
		return 1;
	}
	cJSON *devs = root ? cJSON_GetObjectItemCaseSensitive(root, "devices") : NULL;
	if(root && devs == NULL) devs = cJSON_AddArrayToObject(root, "devices");
	cJSON *taken = root ? registry_names(root) : NULL;
	if(root == NULL || taken == NULL || !cJSON_IsArray(devs)){
		ctl_error("%s: %s", path, root && taken ? "\"devices\" is not a list" : "out of memory");
		cJSON_Delete(root);
		cJSON_Delete(taken);
		return 1;
	}
	int clashes = check_names(rs, taken);
	cJSON_Delete(taken);
	if(clashes || dry_run){
		if(!clashes) printf("%s: %zu devices can be imported into %s (dry run: nothing written)\n", rs->file, rs->n, path);
		cJSON_Delete(root);
		return clashes ? 1 : 0;
	}
	/* The key store may not exist on a fresh gateway: make it, closed to others. */
	char *probe = akz_registry_keystore_path(path, keystore, "x", "");
	char dir[PATH_MAX] = "", *made_dir = NULL;
	if(probe){
		snprintf(dir, sizeof(dir), "%s", probe);
		dir[strlen(dir) - 1] = '\0';   /* "<keystore>/x" -> "<keystore>/" */
		if(mkdir(dir, 0700) == 0) made_dir = dir;
		free(probe);
	}
	size_t done = 0;
	int rc = 1;
	for(; done < rs->n; done++){
		if(make_row(path, keystore, &rs->v[done], iterations, devs, rs->file)) break;
	}
	char *tmp = NULL;
	if(done == rs->n && (tmp = akz_regfile_write_tmp(path, root, err, sizeof(err))) == NULL) ctl_error("%s", err);
	if(tmp){
		/* The registry as the plugin will read it, checked before it replaces the old one. */
		struct akz_registry *reg = NULL;
		if(akz_registry_load(tmp, keystore, ko, print_problem, NULL, &reg)){
			ctl_error("%s: the registry with the new devices has the problems above: nothing imported", path);
		}else if(akz_regfile_replace(tmp, path, err, sizeof(err)) < 0){
			ctl_error("%s", err);
		}else{
			rc = 0;
		}
		akz_registry_free(reg);
		if(rc) unlink(tmp);
		free(tmp);
	}
	if(rc){
		unwrite_keys(path, keystore, rs, done, made_dir);
	}else{
		printf("%s: imported %zu devices into %s (keys in %s); a running broker uses them after a reload (SIGHUP)\n",
				rs->file, rs->n, path, dir);
	}
	cJSON_Delete(root);
	return rc;
}

/* ---- into a running broker (control API) -------------------------------------------------------- */

/* The names the broker uses, from listDevices and listGateways. NULL after printing why. */
static cJSON *broker_names(const struct ctl_conn *conn)
{
	cJSON *taken = cJSON_CreateArray();
	static const char *const cmds[2][2] = {{"listDevices", "devices"}, {"listGateways", "gateways"}};
	for(int l = 0; taken && l < 2; l++){
		cJSON *cmd = cJSON_CreateObject(), *data = NULL;
		if(cmd == NULL || !cJSON_AddStringToObject(cmd, "command", cmds[l][0])){
			cJSON_Delete(cmd);
			cJSON_Delete(taken);
			ctl_error("out of memory");
			return NULL;
		}
		if(ctl_request(conn, cmd, &data)){
			cJSON_Delete(taken);
			return NULL;
		}
		const cJSON *arr = cJSON_GetObjectItemCaseSensitive(data, cmds[l][1]);
		for(const cJSON *e = cJSON_IsArray(arr) ? arr->child : NULL; e; e = e->next){
			const cJSON *id = cJSON_GetObjectItemCaseSensitive(e, "id");
			const cJSON *user = cJSON_GetObjectItemCaseSensitive(e, "username");
			take_name(taken, cJSON_IsString(id) ? id->valuestring : NULL);
			take_name(taken, cJSON_IsString(user) ? user->valuestring : NULL);
		}
		cJSON_Delete(data);
	}
	return taken;
}

/* deleteDevice for id, taking back a device this import made. Prints the key files the broker kept
 * (the control API leaves them in place). Returns 0, or 1 after printing why. */
static int undo_create(const struct ctl_conn *conn, const char *id)
{
	cJSON *cmd = cJSON_CreateObject(), *data = NULL;
	if(cmd == NULL || !cJSON_AddStringToObject(cmd, "command", "deleteDevice") || !cJSON_AddStringToObject(cmd, "id", id)){
		cJSON_Delete(cmd);
		ctl_error("out of memory");
		return 1;
	}
	int rc = ctl_request(conn, cmd, &data);
	const cJSON *kept = cJSON_GetObjectItemCaseSensitive(data, "key_files_kept");
	for(const cJSON *f = cJSON_IsArray(kept) ? kept->child : NULL; f; f = f->next){
		if(cJSON_IsString(f)) ctl_error("device '%s' deleted again; the broker kept its key file %s: remove it "
				"before importing the device again", id, f->valuestring);
	}
	cJSON_Delete(data);
	return rc;
}

/* createDevice for row r. Returns the answer's data (caller frees), or NULL after printing why. */
static cJSON *create_on_broker(const struct ctl_conn *conn, const struct row *r, const char *file)
{
	cJSON *cmd = cJSON_CreateObject(), *key = NULL, *data = NULL;
	bool ok = cmd && cJSON_AddStringToObject(cmd, "command", "createDevice") && cJSON_AddStringToObject(cmd, "id", r->id)
			&& (r->username == NULL || cJSON_AddStringToObject(cmd, "username", r->username))
			&& cJSON_AddStringToObject(cmd, "password", r->password)
			&& (key = cJSON_AddObjectToObject(cmd, "key")) != NULL && cJSON_AddStringToObject(key, "type", r->type)
			&& (r->bits == 0 || cJSON_AddNumberToObject(key, "bits", r->bits));
	if(!ok){
		cJSON_Delete(cmd);
		ctl_error("out of memory");
		return NULL;
	}
	if(ctl_request(conn, cmd, &data)){
		ctl_error("%s:%d: device '%s' was not created (above)", file, r->line, r->id);
		return NULL;
	}
	return data;
}

/* Imports rs through the broker's control API: every row or none (devices made before a failure
 * are deleted again). With reg, the made devices' public keys (and certificates) go into reg for
 * registering. Returns 0, or 1 after printing why. */
static int import_to_broker(const struct ctl_conn *conn, struct rows *rs, bool dry_run, struct fleet *reg, bool cert)
{
	cJSON *taken = broker_names(conn);
	if(taken == NULL) return 1;
	int clashes = check_names(rs, taken);
	cJSON_Delete(taken);
	if(clashes) return 1;
	if(dry_run){
		printf("%s: %zu devices can be imported into the broker (dry run: nothing sent)\n", rs->file, rs->n);
		return 0;
	}
	size_t done = 0;
	for(; done < rs->n; done++){
		const struct row *r = &rs->v[done];
		cJSON *data = create_on_broker(conn, r, rs->file);
		if(data == NULL) break;
		if(reg){
			const cJSON *pem = cJSON_GetObjectItemCaseSensitive(data, "public_key");
			const cJSON *crt = cJSON_GetObjectItemCaseSensitive(data, "certificate");
			struct fleet_dev *d = fleet_add(reg, r->id);
			char err[512];
			if(d == NULL || !cJSON_IsString(pem)){
				if(d) d->problem = strdup("the broker's answer has no public_key");
			}else if(fleet_set_pem(d, 0, pem->valuestring, cert && cJSON_IsString(crt) ? crt->valuestring : NULL,
					err, sizeof(err))){
				d->problem = strdup(err);
			}else if(cert && !cJSON_IsString(crt)){
				d->problem = strdup("the broker's answer has no certificate (an id longer than 64 characters?)");
			}
		}
		cJSON_Delete(data);
	}
	if(done == rs->n){
		printf("%s: imported %zu devices into the broker\n", rs->file, rs->n);
		return 0;
	}
	size_t undone = 0;
	for(size_t i = 0; i < done; i++) undone += undo_create(conn, rs->v[i].id) == 0;
	if(undone == done){
		ctl_error("%s: nothing imported: the %zu devices created before line %d were deleted again", rs->file,
				done, rs->v[done].line);
	}else{
		ctl_error("%s: line %d failed, and only %zu of the %zu devices created before it could be deleted again: "
				"see above", rs->file, rs->v[done].line, undone, done);
	}
	return 1;
}

/* ---- the command ------------------------------------------------------------------------------ */

enum { I_REGISTRY = 1300, I_KEYSTORE, I_BROKER, I_ITERATIONS, I_REGISTER, I_CREATE, I_WORKSPACE, I_DATA_FLOW,
	I_CERT, I_DAYS, I_DRY_RUN, I_JSON, I_CAFILE, I_CAPATH, I_HELP, I_ADMIN_PW_FILE };

static const char import_help[] =
	"usage: akenzactl akenza import FILE.csv (--registry FILE [--keystore DIR] [--iterations N] | --broker [connection])\n"
	"                 [--dry-run] [--register [--create --workspace W --data-flow D] [--cert [--days N]] [--json]\n"
	"                 [API options]]\n"
	"Creates a device for every row of FILE.csv - deviceId,username,password,key type - with a new key\n"
	"pair (key type ec, rsa, rsa:3072 or rsa:4096; an empty username is the deviceId; a first row\n"
	"naming the columns and lines starting with # are skipped; quote fields holding commas):\n"
	"  --registry FILE  into the registry file (created if missing) and its key store; passwords hashed\n"
	"                   with N PBKDF2 iterations (default 210000: ~0.1 s each); reload the broker after\n"
	"  --broker         through the control API of the running broker (-h HOST -p PORT -u USER\n"
	"                   --admin-password-file F | env AKENZACTL_ADMIN_PASSWORD | -P PASS\n"
	"                   --cafile F | --capath D -W SECONDS, as akenzactl device)\n"
	"Every row is checked first, and a bad row is named with its line and field; any failure leaves\n"
	"nothing imported. --register then registers the new devices with akenza (akenza register).\n"
	"The file holds passwords: keep it as private as the registry.\n";

int cmd_import(int argc, char **argv)
{
	static const struct option lo[] = {
		{"registry", required_argument, NULL, I_REGISTRY}, {"keystore", required_argument, NULL, I_KEYSTORE},
		{"broker", no_argument, NULL, I_BROKER}, {"iterations", required_argument, NULL, I_ITERATIONS},
		{"register", no_argument, NULL, I_REGISTER}, {"create", no_argument, NULL, I_CREATE},
		{"workspace", required_argument, NULL, I_WORKSPACE}, {"data-flow", required_argument, NULL, I_DATA_FLOW},
		{"cert", no_argument, NULL, I_CERT}, {"days", required_argument, NULL, I_DAYS},
		{"dry-run", no_argument, NULL, I_DRY_RUN}, {"json", no_argument, NULL, I_JSON},
		{"cafile", required_argument, NULL, I_CAFILE}, {"capath", required_argument, NULL, I_CAPATH},
		{"admin-password-file", required_argument, NULL, I_ADMIN_PW_FILE},
		CTL_API_LONGOPTS, CTL_KEY_LONGOPTS,
		{"help", no_argument, NULL, I_HELP}, {NULL, 0, NULL, 0}};
	struct ctl_api_args a = {.max_retries = -1};
	struct fleet_opts o = {.days = AKZ_X509_DAYS_DEFAULT};
	struct akz_key_opts ko = {0};
	struct ctl_conn conn = {.timeout_s = 30};
	const char *registry = NULL, *keystore = NULL, *admin_pw_file = NULL;
	char admin_pw[1024];
	bool broker = false, reg = false, conn_given = false;
	long iterations = AKZ_PW_ITERATIONS_DEFAULT, v;
	int c;
	optind = 1;
	while((c = getopt_long(argc, argv, "h:p:u:P:W:", lo, NULL)) != -1){
		int api = ctl_api_option(c, optarg, &a);
		if(api < 0) return 2;
		if(api || ctl_key_option(c, optarg, &ko)) continue;
		switch(c){
		case I_REGISTRY: registry = optarg; break;
		case I_KEYSTORE: keystore = optarg; break;
		case I_BROKER: broker = true; break;
		case I_ITERATIONS:
			if(ctl_parse_long("--iterations", optarg, 1000, AKZ_PW_ITERATIONS_MAX, &iterations)) return 2;
			break;
		case I_DAYS:
			if(ctl_parse_long("--days", optarg, 1, AKZ_X509_DAYS_MAX, &v)) return 2;
			o.days = (int)v;
			break;
		case 'p':
			if(ctl_parse_long("-p", optarg, 1, 65535, &v)) return 2;
			conn.port = (int)v;
			conn_given = true;
			break;
		case 'W':
			if(ctl_parse_long("-W", optarg, 1, 3600, &v)) return 2;
			conn.timeout_s = (int)v;
			conn_given = true;
			break;
		case 'h': conn.host = optarg; conn_given = true; break;
		case 'u': conn.user = optarg; conn_given = true; break;
		case 'P': conn.password = optarg; conn_given = true; break;
		case I_ADMIN_PW_FILE: admin_pw_file = optarg; conn_given = true; break;
		case I_CAFILE: conn.cafile = optarg; conn_given = true; break;
		case I_CAPATH: conn.capath = optarg; conn_given = true; break;
		case I_REGISTER: reg = true; break;
		case I_CREATE: o.create = true; break;
		case I_WORKSPACE: o.workspace = optarg; break;
		case I_DATA_FLOW: o.data_flow = optarg; break;
		case I_CERT: o.cert = true; break;
		case I_DRY_RUN: o.dry_run = true; break;
		case I_JSON: o.json = true; break;
		case I_HELP: printf("%s%s", import_help, ctl_api_help); return 0;
		default: fprintf(stderr, "%s", import_help); return 2;
		}
	}
	const char *why = argc - optind != 1 ? "give one CSV file"
			: (registry != NULL) == broker ? "give --registry FILE or --broker (one of them)"
			: !broker && conn_given ? "connection options go with --broker"
			: broker && keystore ? "--keystore goes with --registry (the broker has its own)"
			: o.create != (o.workspace != NULL && o.data_flow != NULL) ? "--create goes with --workspace and --data-flow"
			: !reg && (o.create || o.cert || o.json) ? "--create, --cert and --json go with --register" : NULL;
	if(why){
		ctl_error("akenza import: %s", why);
		fprintf(stderr, "%s", import_help);
		return 2;
	}
	if(broker && ctl_admin_password(&conn, admin_pw_file, admin_pw, sizeof(admin_pw))) return 2;
	struct rows rs = {0};
	if(read_csv(argv[optind], &rs)){
		ctl_error("%s: %d problem%s: nothing imported", argv[optind], rs.errors, rs.errors == 1 ? "" : "s");
		free_rows(&rs);
		OPENSSL_cleanse(admin_pw, sizeof(admin_pw));
		return 1;
	}
	struct fleet f = {0};
	int rc = broker ? import_to_broker(&conn, &rs, o.dry_run, reg ? &f : NULL, o.cert)
			: import_to_file(registry, keystore, (int)iterations, &rs, o.dry_run, &ko);
	if(rc == 0 && reg && o.dry_run){
		fprintf(stderr, "akenzactl: dry run: the devices do not exist yet, so nothing is registered with akenza\n");
	}else if(rc == 0 && reg){
		char **ids = malloc(rs.n * sizeof(*ids));
		for(size_t i = 0; ids && i < rs.n; i++) ids[i] = rs.v[i].id;
		if(!broker && (ids == NULL || fleet_from_registry(&f, registry, keystore, &ko, ids, rs.n, false, &o))){
			rc = 1;
		}else{
			rc = fleet_register(&a, &o, &f);
		}
		free(ids);
	}
	fleet_free(&f);
	free_rows(&rs);
	OPENSSL_cleanse(admin_pw, sizeof(admin_pw));
	return rc;
}
