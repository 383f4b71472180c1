/* keystore.c - device private keys: loading through OSSL_STORE, checks, kid, generation. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <strings.h>
#include <openssl/core_names.h>
#include <openssl/decoder.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/bio.h>
#include <openssl/pem.h>
#include <openssl/store.h>
#include <openssl/ui.h>
#include <openssl/x509.h>
#include "akz_util.h"
#include "akz_keystore.h"
#include "akz_keystore_int.h"

#define PASSPHRASE_MAX 1024
/* A PEM RSA-4096 key is ~3.3 KB and a key with a certificate chain tens of KB: a larger "key"
 * is a wrong path (a log, a device file in /proc), which OSSL_STORE would read whole. */
#define KEY_FILE_MAX (1024L * 1024L)

struct akz_key {
	atomic_int refs;
	enum akz_alg alg;
	EVP_PKEY *pkey;
	char *uri;
	char kid[AKZ_KID_LEN];
	char header_b64[160];
	/* Signing state kept with the key so that minting fetches no algorithm and parses nothing:
	 * OpenSSL 3's per-call fetches cost as much as an ECDSA signature. */
	pthread_mutex_t sign_lock;
	EVP_PKEY_CTX *sign_ctx;
};

/* What the passphrase callback saw, to tell "encrypted, no passphrase" from "wrong passphrase". */
struct pass_state {
	const char *file;
	bool asked;
	bool failed;
	char why[256];
};

const char *akz_alg_name(enum akz_alg alg)
{
	switch(alg){
	case AKZ_ALG_RS256: return "RS256";
	case AKZ_ALG_ES256: return "ES256";
	case AKZ_ALG_NONE: break;
	}
	return "none";
}

/* Reads the first line of the passphrase file into buf. Returns its length, or -1 with st->why. */
static int read_passphrase(struct pass_state *st, char *buf, int size)
{
	FILE *f = fopen(st->file, "r");
	if(f == NULL){
		snprintf(st->why, sizeof(st->why), "cannot read passphrase file %s: %s", st->file, strerror(errno));
		return -1;
	}
	char line[PASSPHRASE_MAX];
	char *ok = fgets(line, sizeof(line), f);
	fclose(f);
	if(ok == NULL){
		snprintf(st->why, sizeof(st->why), "passphrase file %s is empty", st->file);
		return -1;
	}
	size_t n = strcspn(line, "\r\n");
	if(n == 0 || n >= (size_t)size){
		snprintf(st->why, sizeof(st->why), "passphrase file %s: %s", st->file,
				n == 0 ? "the first line is empty" : "passphrase too long");
		OPENSSL_cleanse(line, sizeof(line));
		return -1;
	}
	memcpy(buf, line, n);
	OPENSSL_cleanse(line, sizeof(line));
	return (int)n;
}

/* pem_password_cb: never prompts; the passphrase comes from the configured file only. */
static int passphrase_cb(char *buf, int size, int rwflag, void *u)
{
	struct pass_state *st = u;
	(void)rwflag;
	st->asked = true;
	if(st->file == NULL){
		st->failed = true;
		return -1;
	}
	int n = read_passphrase(st, buf, size);
	if(n < 0) st->failed = true;
	return n;
}

/* True if the URI scheme s[0..len) has an OSSL_STORE loader in some loaded provider (pkcs11:,
 * tpm2:, ...). Names are compared as OpenSSL does, without regard to case. */
static bool has_store_loader(const char *s, size_t len)
{
	char scheme[32];
	if(len >= sizeof(scheme)) return false;
	memcpy(scheme, s, len);
	scheme[len] = '\0';
	ERR_set_mark();
	OSSL_STORE_LOADER *l = OSSL_STORE_LOADER_fetch(NULL, scheme, NULL);
	ERR_pop_to_mark();   /* "not found" is an answer here, not an error */
	OSSL_STORE_LOADER_free(l);
	return l != NULL;
}

enum akz_keyref akz_keyref_parse(const char *ref, const char **path)
{
	*path = NULL;
	size_t n = strspn(ref, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+-.");
	bool scheme = n > 0 && ref[n] == ':' && ((ref[0] | 0x20) >= 'a' && (ref[0] | 0x20) <= 'z');
	if(scheme && n == 4 && strncasecmp(ref, "file", 4) == 0){
		const char *p = ref + 5;
		if(strncmp(p, "//", 2) == 0){
			/* file:///path and file://localhost/path, as OpenSSL's file loader: no other host. */
			p += 2;
			if(strncasecmp(p, "localhost/", 10) == 0) p += 9;
			else if(*p != '/') return AKZ_KEYREF_BAD;
		}
		if(*p == '\0') return AKZ_KEYREF_BAD;
		*path = p;
		return AKZ_KEYREF_PATH;
	}
	if(scheme && has_store_loader(ref, n)) return AKZ_KEYREF_STORE;
	if(ref[0] == '\0') return AKZ_KEYREF_BAD;
	*path = ref;   /* "keys:a.pem" names a file unless some provider loads "keys:" URIs */
	return AKZ_KEYREF_PATH;
}

/* Opens and reads a key file of at most KEY_FILE_MAX bytes, never blocking: anything but a regular
 * file (a fifo, a device, a directory, a socket) is refused before it is opened for reading, and
 * again on the opened descriptor in case the path changed in between. With secret, a file that
 * group or others can read is refused (unless opts allow it). Returns a NUL-terminated buffer
 * (the caller cleanses and frees it, OPENSSL_clear_free(buf, *len + 1)) and its length, or NULL
 * with the reason naming path. */
static char *read_key_file(const char *path, bool secret, const struct akz_key_opts *opts, size_t *len,
		char *err, size_t errlen)
{
	struct stat sb;
	int fd = -1;
	if(stat(path, &sb) != 0){
		akz_set_err(err, errlen, "%s: %s", path, strerror(errno));
		return NULL;
	}
	if(S_ISREG(sb.st_mode)){
		fd = open(path, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
		if(fd < 0 || fstat(fd, &sb) != 0){
			akz_set_err(err, errlen, "%s: %s", path, strerror(errno));
			if(fd >= 0) close(fd);
			return NULL;
		}
	}
	const char *bad = S_ISDIR(sb.st_mode) ? "is a directory, not a key file"
			: !S_ISREG(sb.st_mode) ? "not a regular file (a fifo, a device or a socket is never read)"
			: sb.st_size == 0 ? "empty file" : NULL;
	if(bad){
		akz_set_err(err, errlen, "%s: %s", path, bad);
	}else if(sb.st_size > KEY_FILE_MAX){
		akz_set_err(err, errlen, "%s: %lld bytes: larger than any key file (1 MiB at most)", path,
				(long long)sb.st_size);
		bad = "too large";
	}else if(secret && (sb.st_mode & 077) && !(opts && opts->allow_group_readable)){
		akz_set_err(err, errlen, "%s: mode %04o: group or others can read it; chmod 600 it "
				"(or set plugin_opt_allow_readable_keys)", path, (unsigned)(sb.st_mode & 07777));
		bad = "readable";
	}
	if(bad){
		if(fd >= 0) close(fd);
		return NULL;
	}
	size_t cap = (size_t)sb.st_size, n = 0;
	char *buf = malloc(cap + 1);
	if(buf == NULL) akz_set_err(err, errlen, "%s: out of memory", path);
	while(buf && n < cap){
		ssize_t r = read(fd, buf + n, cap - n);
		if(r < 0 && errno == EINTR) continue;
		if(r < 0){
			akz_set_err(err, errlen, "%s: %s", path, strerror(errno));
			OPENSSL_clear_free(buf, cap + 1);
			buf = NULL;
		}
		if(r <= 0) break;
		n += (size_t)r;
	}
	close(fd);
	if(buf == NULL) return NULL;
	buf[n] = '\0';
	*len = n;
	return buf;
}

/* Decides the JWT algorithm for a key, or explains why akenza would not take it. */
static enum akz_alg choose_alg(EVP_PKEY *pkey, const char *uri, char *err, size_t errlen)
{
	if(EVP_PKEY_is_a(pkey, "RSA")){
		int bits = EVP_PKEY_get_bits(pkey);
		if(bits < 2048){
			akz_set_err(err, errlen, "%s: RSA key of %d bits: akenza needs at least 2048", uri, bits);
			return AKZ_ALG_NONE;
		}
		return AKZ_ALG_RS256;
	}
	if(EVP_PKEY_is_a(pkey, "EC")){
		char group[64] = "";
		size_t glen = 0;
		if(EVP_PKEY_get_utf8_string_param(pkey, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof(group), &glen) != 1){
			akz_set_err(err, errlen, "%s: EC key with unnamed curve: akenza accepts only P-256 (prime256v1)", uri);
			return AKZ_ALG_NONE;
		}
		if(strcmp(group, "prime256v1") != 0 && strcmp(group, "P-256") != 0){
			akz_set_err(err, errlen, "%s: EC curve %s: akenza accepts only P-256 (prime256v1)", uri, group);
			return AKZ_ALG_NONE;
		}
		return AKZ_ALG_ES256;
	}
	const char *type = EVP_PKEY_get0_type_name(pkey);
	akz_set_err(err, errlen, "%s: %s key: akenza accepts only RSA (2048 bits or more) and EC P-256 keys",
			uri, type ? type : "unknown");
	return AKZ_ALG_NONE;
}

int akz_pkey_kid(EVP_PKEY *pkey, char kid[AKZ_KID_LEN], char *err, size_t errlen)
{
	/* akenza's kid is taken over the SubjectPublicKeyInfo with an UNCOMPRESSED EC point (what
	 * pycryptodome exports), whatever form the PEM stored: encode a copy set to uncompressed. */
	EVP_PKEY *pub = EVP_PKEY_dup(pkey);
	EVP_PKEY *use = pub ? pub : pkey;
	if(EVP_PKEY_is_a(use, "EC") && pub){
		EVP_PKEY_set_utf8_string_param(pub, OSSL_PKEY_PARAM_EC_POINT_CONVERSION_FORMAT,
				OSSL_PKEY_EC_POINT_CONVERSION_FORMAT_UNCOMPRESSED);
	}
	unsigned char *der = NULL;
	int len = i2d_PUBKEY(use, &der);
	EVP_PKEY_free(pub);
	if(len <= 0){
		akz_set_err(err, errlen, "cannot encode the public key");
		return -1;
	}
	unsigned char md[32];
	unsigned int mdlen = 0;
	int ok = EVP_Digest(der, (size_t)len, md, &mdlen, EVP_sha256(), NULL);
	OPENSSL_free(der);
	if(ok != 1 || mdlen != 32){
		akz_set_err(err, errlen, "SHA-256 failed");
		return -1;
	}
	static const char hex[] = "0123456789abcdef";
	for(size_t i = 0; i < 32; i++){
		kid[2*i] = hex[md[i] >> 4];
		kid[2*i+1] = hex[md[i] & 15];
	}
	kid[64] = '\0';
	return 0;
}

/* What a store held besides (or instead of) a private key, to say why none was found. */
struct found {
	EVP_PKEY *pkey;
	bool pubkey, cert, other, two_keys;
};

static void collect_item(struct found *f, OSSL_STORE_INFO *info)
{
	switch(OSSL_STORE_INFO_get_type(info)){
	case OSSL_STORE_INFO_PKEY:
		if(f->pkey){
			f->two_keys = true;
		}else{
			f->pkey = OSSL_STORE_INFO_get1_PKEY(info);
		}
		break;
	case OSSL_STORE_INFO_PUBKEY:
		f->pubkey = true;
		break;
	case OSSL_STORE_INFO_CERT:
		f->cert = true;
		break;
	default:
		f->other = true;
		break;
	}
}

/* The common case, a file holding one unencrypted PEM private key, is decoded with one decoder
 * context kept for the process. OpenSSL 3.0 builds a context by walking every decoder of every
 * provider under a lock: 0.5 ms, fifteen times the decoding itself, which made a registry of
 * 1,000 devices take 0.6 s to load. OSSL_STORE stays the way for everything else, and for the
 * reason when this path declines. The context is not safe for two threads: fast_lock. */
static pthread_mutex_t fast_lock = PTHREAD_MUTEX_INITIALIZER;
static OSSL_DECODER_CTX *fast_dctx;
static EVP_PKEY *fast_out;       /* where fast_dctx puts what it decodes */

/* True if buf holds exactly one PEM block and it is an unencrypted private key (PKCS#8, SEC1
 * or PKCS#1): what the fast path may decode with no passphrase and no choice to make. */
static bool is_single_plain_pem_key(const char *buf)
{
	static const char *const labels[] = {
		"-----BEGIN PRIVATE KEY-----", "-----BEGIN EC PRIVATE KEY-----",
		"-----BEGIN RSA PRIVATE KEY-----",
	};
	const char *begin = strstr(buf, "-----BEGIN ");
	if(begin == NULL || strstr(begin + 1, "-----BEGIN ") != NULL) return false;
	if(strstr(begin, "Proc-Type:") != NULL) return false;   /* legacy encrypted PEM */
	for(size_t i = 0; i < sizeof(labels) / sizeof(labels[0]); i++){
		if(strncmp(begin, labels[i], strlen(labels[i])) == 0) return true;
	}
	return false;
}

/* Decodes buf (len bytes, NUL-terminated) with the shared context if it is a single plain PEM
 * private key. Returns the key, or NULL when this path declines or fails: the caller then goes
 * through OSSL_STORE, which decodes what this cannot and explains what nobody can. Never sets
 * an error. */
static EVP_PKEY *decode_plain_pem(const char *buf, size_t len)
{
	EVP_PKEY *pkey = NULL;
	if(is_single_plain_pem_key(buf)){
		pthread_mutex_lock(&fast_lock);
		if(fast_dctx == NULL){
			fast_dctx = OSSL_DECODER_CTX_new_for_pkey(&fast_out, "PEM", NULL, NULL,
					EVP_PKEY_KEYPAIR, NULL, NULL);
		}
		const unsigned char *data = (const unsigned char *)buf;
		size_t left = len;
		fast_out = NULL;
		if(fast_dctx && OSSL_DECODER_from_data(fast_dctx, &data, &left) == 1) pkey = fast_out;
		else EVP_PKEY_free(fast_out);
		fast_out = NULL;
		pthread_mutex_unlock(&fast_lock);
		ERR_clear_error();
	}
	return pkey;
}

void akz_keystore_cleanup(void)
{
	pthread_mutex_lock(&fast_lock);
	OSSL_DECODER_CTX_free(fast_dctx);
	fast_dctx = NULL;
	pthread_mutex_unlock(&fast_lock);
}

/* Takes the private key out of a store: the file contents in mem (len bytes) when mem is not
 * NULL, so that OpenSSL never opens a path the checks did not see, else the provider URI uri.
 * uri names the key in reasons. Returns the key, or NULL with a reason. */
static EVP_PKEY *load_pkey(const char *uri, const char *mem, size_t len, const struct akz_key_opts *opts,
		char *err, size_t errlen)
{
	struct pass_state ps = {.file = opts ? opts->passphrase_file : NULL};
	struct found f = {0};
	UI_METHOD *ui = UI_UTIL_wrap_read_pem_callback(passphrase_cb, 0);
	if(ui == NULL){
		akz_set_err(err, errlen, "%s: out of memory", uri);
		return NULL;
	}
	ERR_clear_error();
	BIO *bio = mem ? BIO_new_mem_buf(mem, (int)len) : NULL;
	OSSL_STORE_CTX *ctx = mem ? (bio ? OSSL_STORE_attach(bio, "file", NULL, NULL, ui, &ps, NULL, NULL, NULL) : NULL)
			: OSSL_STORE_open_ex(uri, NULL, NULL, ui, &ps, NULL, NULL, NULL);
	if(ctx == NULL){
		unsigned long e = ERR_peek_last_error();
		akz_set_err(err, errlen, "%s: cannot open: %s", uri, e ? ERR_reason_error_string(e) : "no loader for this URI");
		goto out;
	}
	/* Only keys are wanted; a cap on items keeps a huge bundle from being read to the end. */
	for(int items = 0; items < 64 && !OSSL_STORE_eof(ctx); items++){
		OSSL_STORE_INFO *info = OSSL_STORE_load(ctx);
		if(info == NULL){
			if(OSSL_STORE_error(ctx)) continue;
			break;
		}
		collect_item(&f, info);
		OSSL_STORE_INFO_free(info);
	}
	OSSL_STORE_close(ctx);
	if(f.pkey){
		if(f.two_keys){
			akz_set_err(err, errlen, "%s: holds more than one private key: keep one key per file", uri);
			EVP_PKEY_free(f.pkey);
			f.pkey = NULL;
		}
		goto out;
	}
	if(ps.asked && ps.file == NULL){
		akz_set_err(err, errlen, "%s: the key is encrypted: set plugin_opt_key_passphrase_file "
				"(akenzactl: --passphrase-file)", uri);
	}else if(ps.asked && ps.why[0]){
		akz_set_err(err, errlen, "%s: %s", uri, ps.why);
	}else if(ps.asked){
		akz_set_err(err, errlen, "%s: cannot decrypt the key: wrong passphrase in %s", uri, ps.file);
	}else if(f.pubkey || f.cert){
		akz_set_err(err, errlen, "%s: holds a %s but no private key", uri, f.cert ? "certificate" : "public key");
	}else{
		akz_set_err(err, errlen, "%s: no private key found (not a PEM or DER key file)", uri);
	}
out:
	BIO_free(bio);
	UI_destroy_method(ui);
	ERR_clear_error();
	return f.pkey;
}

/* Prepares the reusable signing context of a key. Returns 0, or -1 with a reason. */
static int prepare_signing(struct akz_key *k, char *err, size_t errlen)
{
	k->sign_ctx = EVP_PKEY_CTX_new_from_pkey(NULL, k->pkey, NULL);
	if(k->sign_ctx == NULL || EVP_PKEY_sign_init(k->sign_ctx) != 1
			|| EVP_PKEY_CTX_set_signature_md(k->sign_ctx, EVP_sha256()) != 1
			|| (k->alg == AKZ_ALG_RS256
				&& EVP_PKEY_CTX_set_rsa_padding(k->sign_ctx, RSA_PKCS1_PADDING) != 1)){
		akz_set_err(err, errlen, "%s: cannot prepare signing with this key", k->uri);
		return -1;
	}
	return 0;
}

/* Wraps a checked EVP_PKEY (ownership taken, also on failure) into a new akz_key. */
static struct akz_key *wrap_pkey(EVP_PKEY *pkey, enum akz_alg alg, const char *uri, char *err, size_t errlen)
{
	struct akz_key *k = calloc(1, sizeof(*k));
	if(k == NULL){
		EVP_PKEY_free(pkey);
		akz_set_err(err, errlen, "%s: out of memory", uri);
		return NULL;
	}
	atomic_init(&k->refs, 1);
	k->pkey = pkey;
	k->alg = alg;
	pthread_mutex_init(&k->sign_lock, NULL);
	k->uri = strdup(uri);
	if(k->uri == NULL){
		akz_set_err(err, errlen, "%s: out of memory", uri);
		akz_key_unref(k);
		return NULL;
	}
	char why[200];
	if(akz_pkey_kid(pkey, k->kid, why, sizeof(why))){
		akz_set_err(err, errlen, "%s: %s", uri, why);
		akz_key_unref(k);
		return NULL;
	}
	if(akz_jwt_header_b64(alg, k->kid, k->header_b64, sizeof(k->header_b64)) == 0){
		akz_set_err(err, errlen, "%s: cannot encode the JWT header", uri);
		akz_key_unref(k);
		return NULL;
	}
	if(prepare_signing(k, err, errlen)){
		akz_key_unref(k);
		return NULL;
	}
	return k;
}

int akz_key_load(const char *uri, const struct akz_key_opts *opts, struct akz_key **out,
		char *err, size_t errlen)
{
	*out = NULL;
	if(uri == NULL || uri[0] == '\0'){
		akz_set_err(err, errlen, "empty key path");
		return -1;
	}
	const char *path;
	EVP_PKEY *pkey = NULL;
	switch(akz_keyref_parse(uri, &path)){
	case AKZ_KEYREF_BAD:
		akz_set_err(err, errlen, "%s: a file: URI names a local file: file:///path or file:/path", uri);
		return -1;
	case AKZ_KEYREF_STORE:
		pkey = load_pkey(uri, NULL, 0, opts, err, errlen);
		break;
	case AKZ_KEYREF_PATH: {
		size_t len = 0;
		char *buf = read_key_file(path, true, opts, &len, err, errlen);
		if(buf == NULL) return -1;
		pkey = decode_plain_pem(buf, len);
		if(pkey == NULL) pkey = load_pkey(uri, buf, len, opts, err, errlen);
		OPENSSL_clear_free(buf, len + 1);
		break;
	}
	}
	if(pkey == NULL) return -1;
	enum akz_alg alg = choose_alg(pkey, uri, err, errlen);
	if(alg == AKZ_ALG_NONE){
		EVP_PKEY_free(pkey);
		return -1;
	}
	*out = wrap_pkey(pkey, alg, uri, err, errlen);
	return *out ? 0 : -1;
}

struct akz_key *akz_key_ref(struct akz_key *key)
{
	if(key) atomic_fetch_add(&key->refs, 1);
	return key;
}

void akz_key_unref(struct akz_key *key)
{
	if(key == NULL || atomic_fetch_sub(&key->refs, 1) != 1) return;
	EVP_PKEY_CTX_free(key->sign_ctx);
	EVP_PKEY_free(key->pkey);
	pthread_mutex_destroy(&key->sign_lock);
	free(key->uri);
	free(key);
}

enum akz_alg akz_key_alg(const struct akz_key *key) { return key->alg; }
const char *akz_key_kid(const struct akz_key *key) { return key->kid; }
const char *akz_key_uri(const struct akz_key *key) { return key->uri; }
EVP_PKEY *akz_key_pkey(const struct akz_key *key) { return key->pkey; }
const char *akz_key_header_b64(const struct akz_key *key) { return key->header_b64; }

int akz_key_sign_digest(const struct akz_key *key, const unsigned char digest[32],
		unsigned char *sig, size_t *siglen)
{
	struct akz_key *k = (struct akz_key *)key;   /* the lock and the context are mutable state */
	pthread_mutex_lock(&k->sign_lock);
	int ok = EVP_PKEY_sign(k->sign_ctx, sig, siglen, digest, 32);
	pthread_mutex_unlock(&k->sign_lock);
	return ok == 1 ? 0 : -1;
}

int akz_file_kid(const char *path, const struct akz_key_opts *opts, char kid[AKZ_KID_LEN],
		char *err, size_t errlen)
{
	struct akz_key *k = NULL;
	char why[512];

	/* A private key first (with all its checks); else a public key or certificate. */
	if(akz_key_load(path, opts, &k, why, sizeof(why)) == 0){
		memcpy(kid, k->kid, AKZ_KID_LEN);
		akz_key_unref(k);
		return 0;
	}
	const char *file;
	size_t len = 0;
	char *buf = akz_keyref_parse(path, &file) == AKZ_KEYREF_PATH
			? read_key_file(file, false, opts, &len, NULL, 0) : NULL;
	if(buf == NULL){
		akz_set_err(err, errlen, "%s", why);
		return -1;
	}
	BIO *bio = BIO_new_mem_buf(buf, (int)len);
	EVP_PKEY *pub = bio ? PEM_read_bio_PUBKEY(bio, NULL, NULL, NULL) : NULL;
	BIO_free(bio);
	OPENSSL_clear_free(buf, len + 1);
	ERR_clear_error();
	if(pub == NULL){
		akz_set_err(err, errlen, "%s", why);
		return -1;
	}
	int rc = -1;
	if(choose_alg(pub, path, err, errlen) != AKZ_ALG_NONE) rc = akz_pkey_kid(pub, kid, err, errlen);
	EVP_PKEY_free(pub);
	return rc;
}

char *akz_key_public_pem(const struct akz_key *key)
{
	BIO *bio = BIO_new(BIO_s_mem());
	char *out = NULL;
	if(bio && PEM_write_bio_PUBKEY(bio, key->pkey) == 1){
		char *data;
		long n = BIO_get_mem_data(bio, &data);
		out = malloc((size_t)n + 1);
		if(out){
			memcpy(out, data, (size_t)n);
			out[n] = '\0';
		}
	}
	BIO_free(bio);
	return out;
}

int akz_key_generate(enum akz_alg alg, int bits, struct akz_key **out, char *err, size_t errlen)
{
	*out = NULL;
	EVP_PKEY *pkey = NULL;
	if(alg == AKZ_ALG_ES256){
		pkey = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
	}else if(alg == AKZ_ALG_RS256){
		if(bits != 2048 && bits != 3072 && bits != 4096){
			akz_set_err(err, errlen, "RSA key size %d: use 2048, 3072 or 4096", bits);
			return -1;
		}
		pkey = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)bits);
	}else{
		akz_set_err(err, errlen, "unknown key type");
		return -1;
	}
	if(pkey == NULL){
		akz_set_err(err, errlen, "key generation failed");
		return -1;
	}
	*out = wrap_pkey(pkey, alg, "(generated)", err, errlen);
	return *out ? 0 : -1;
}

/* Writes data to path through a temporary file in the same directory, fsynced and linked
 * into place only if path does not exist yet. Returns 0, or -1 with a reason. */
static int write_new_file(const char *path, const char *data, size_t len, mode_t mode,
		char *err, size_t errlen)
{
	char tmp[4096];
	if(snprintf(tmp, sizeof(tmp), "%s.tmp.XXXXXX", path) >= (int)sizeof(tmp)){
		akz_set_err(err, errlen, "%s: path too long", path);
		return -1;
	}
	int fd = mkstemp(tmp);
	if(fd < 0){
		akz_set_err(err, errlen, "%s: cannot create: %s", path, strerror(errno));
		return -1;
	}
	int rc = -1;
	size_t off = 0;
	if(fchmod(fd, mode) != 0) goto fail;
	while(off < len){
		ssize_t n = write(fd, data + off, len - off);
		if(n < 0){
			if(errno == EINTR) continue;
			goto fail;
		}
		off += (size_t)n;
	}
	if(fsync(fd) != 0) goto fail;
	/* link() refuses an existing target, where rename() would silently replace a key. */
	if(link(tmp, path) != 0) goto fail;
	rc = 0;
fail:
	if(rc) akz_set_err(err, errlen, "%s: %s", path, errno == EEXIST ? "already exists: refusing to overwrite a key" : strerror(errno));
	close(fd);
	unlink(tmp);
	return rc;
}

int akz_key_write(const struct akz_key *key, const char *priv_path, const char *pub_path,
		char *err, size_t errlen)
{
	BIO *bio = BIO_new(BIO_s_mem());
	if(bio == NULL || PEM_write_bio_PrivateKey(bio, key->pkey, NULL, NULL, 0, NULL, NULL) != 1){
		BIO_free(bio);
		akz_set_err(err, errlen, "%s: cannot encode the private key", priv_path);
		return -1;
	}
	char *data;
	long n = BIO_get_mem_data(bio, &data);
	int rc = write_new_file(priv_path, data, (size_t)n, 0600, err, errlen);
	OPENSSL_cleanse(data, (size_t)n);
	BIO_free(bio);
	if(rc || pub_path == NULL) return rc;
	char *pem = akz_key_public_pem(key);
	if(pem == NULL){
		akz_set_err(err, errlen, "%s: cannot encode the public key", pub_path);
		return -1;
	}
	rc = write_new_file(pub_path, pem, strlen(pem), 0644, err, errlen);
	free(pem);
	return rc;
}
