/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
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
#include <openssl/provider.h>
#include <openssl/store.h>
#include <openssl/ui.h>
#include <openssl/x509.h>
#include "akz_util.h"
#include "akz_keystore.h"
#include "akz_keystore_int.h"
#include "akz_keythread.h"
#include "akz_tss2.h"

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
	/* A key held in a provider (a TPM): pkey is only its public half, and each signature loads
	 * the private half again on the key thread (keythread.c), from blob (a TSS2 PEM kept from
	 * loading) or else from uri (handle:...), and lets it go: a TPM has room for two or three
	 * loaded keys, and one that restarted has forgotten every key loaded before. */
	bool held;
	char store[32];              /* the provider holding it ("tpm2"); "" for keys in memory */
	char *blob;
	size_t bloblen;
	char *passphrase_file;       /* the key's authorisation value, if it has one */
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

/* True if the URI scheme s[0..len) has an OSSL_STORE loader in the key providers
 * (plugin_opt_providers) or in OpenSSL's default context (pkcs11:, handle:, ...). Names are
 * compared as OpenSSL does, without regard to case. Not on the key thread. */
static bool has_store_loader(const char *s, size_t len)
{
	char scheme[32];
	if(len >= sizeof(scheme)) return false;
	memcpy(scheme, s, len);
	scheme[len] = '\0';
	/* Providers that did not load or answer cannot tell: their error beats "no such file". */
	if(akz_keythread_has_loader(scheme) != 0) return true;
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
	char why[256];               /* the loader's last error, for URIs */
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

/* Keeps the reason of a failed OSSL_STORE_load: for a device URI it is what the device said. */
static void store_error_text(char *buf, size_t len)
{
	if(ERR_peek_last_error()) akz_openssl_error(buf, len, false);
}

/* Takes the private key out of a store in libctx (NULL: the default one): the file contents in
 * mem (len bytes) when mem is not NULL, so that OpenSSL never opens a path the checks did not
 * see, else the provider URI uri. uri names the key in reasons. Returns the key, or NULL with a
 * reason. */
static EVP_PKEY *load_pkey(const char *uri, const char *mem, size_t len, const struct akz_key_opts *opts,
		OSSL_LIB_CTX *libctx,
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
	OSSL_STORE_CTX *ctx = mem ? (bio ? OSSL_STORE_attach(bio, "file", libctx, NULL, ui, &ps, NULL, NULL, NULL) : NULL)
			: OSSL_STORE_open_ex(uri, libctx, NULL, ui, &ps, NULL, NULL, NULL);
	if(ctx == NULL){
		unsigned long e = ERR_peek_last_error();
		akz_set_err(err, errlen, "%s: cannot open: %s", uri, e ? ERR_reason_error_string(e) : "no loader for this URI");
		goto out;
	}
	/* Only keys are wanted; a cap on items keeps a huge bundle from being read to the end. */
	for(int items = 0; items < 64 && !OSSL_STORE_eof(ctx); items++){
		OSSL_STORE_INFO *info = OSSL_STORE_load(ctx);
		if(info == NULL){
			if(OSSL_STORE_error(ctx)){
				store_error_text(f.why, sizeof(f.why));
				continue;
			}
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
		if(mem) akz_set_err(err, errlen, "%s: no private key found (not a PEM or DER key file)", uri);
		else akz_set_err(err, errlen, "%s: no private key there%s%s", uri, f.why[0] ? ": " : "", f.why);
	}
out:
	BIO_free(bio);
	UI_destroy_method(ui);
	ERR_clear_error();
	return f.pkey;
}

/* A signing context for pkey in libctx, set up for alg. The signature comes from the provider
 * that holds the key: fetched without a preference, OpenSSL 3.0 may take another provider's
 * ECDSA or RSA and hand it an exported copy of the key, which for a TPM key has no private
 * half ("missing private key"). Returns it, or NULL. */
static EVP_PKEY_CTX *new_sign_ctx(OSSL_LIB_CTX *libctx, EVP_PKEY *pkey, enum akz_alg alg)
{
	const OSSL_PROVIDER *prov = EVP_PKEY_get0_provider(pkey);
	char propq[64] = "";
	if(prov) snprintf(propq, sizeof(propq), "?provider=%s", OSSL_PROVIDER_get0_name(prov));
	EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_pkey(libctx, pkey, propq[0] ? propq : NULL);
	if(ctx == NULL || EVP_PKEY_sign_init(ctx) != 1
			|| EVP_PKEY_CTX_set_signature_md(ctx, EVP_sha256()) != 1
			|| (alg == AKZ_ALG_RS256 && EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_PADDING) != 1)){
		EVP_PKEY_CTX_free(ctx);
		return NULL;
	}
	return ctx;
}

/* Prepares the reusable signing context of a key in memory. Returns 0, or -1 with a reason. */
static int prepare_signing(struct akz_key *k, char *err, size_t errlen)
{
	if(k->held) return 0;
	k->sign_ctx = new_sign_ctx(NULL, k->pkey, k->alg);
	if(k->sign_ctx == NULL){
		akz_set_err(err, errlen, "%s: cannot prepare signing with this key", k->uri);
		return -1;
	}
	return 0;
}

/* Wraps a checked EVP_PKEY (ownership taken, also on failure) into a new akz_key; store names
 * the provider holding the private half when pkey is only the public half (NULL otherwise). */
static struct akz_key *wrap_pkey(EVP_PKEY *pkey, enum akz_alg alg, const char *uri, const char *store,
		char *err, size_t errlen)
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
	k->held = store != NULL;
	snprintf(k->store, sizeof(k->store), "%s", store ? store : "");
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

/* ---- keys held in a provider (a TPM) -------------------------------------------------------- */

/* A public-only copy of pkey held by the default provider, so that the kid, the public PEM and
 * the checks never reach the device. Returns it, or NULL. */
static EVP_PKEY *public_copy(EVP_PKEY *pkey)
{
	unsigned char *der = NULL;
	int len = i2d_PUBKEY(pkey, &der);
	if(len <= 0) return NULL;
	const unsigned char *p = der;
	EVP_PKEY *pub = d2i_PUBKEY_ex(NULL, &p, len, NULL, "?provider=default");
	OPENSSL_free(der);
	return pub;
}

/* The name of the provider holding pkey's private half in *name; true if that is a device
 * (not one of OpenSSL's own providers, which keep keys in memory). */
static bool held_in_device(EVP_PKEY *pkey, const char **name)
{
	static const char *const builtin[] = {"default", "fips", "base", "legacy"};
	const OSSL_PROVIDER *prov = EVP_PKEY_get0_provider(pkey);
	*name = prov ? OSSL_PROVIDER_get0_name(prov) : "default";
	for(size_t i = 0; i < sizeof(builtin) / sizeof(builtin[0]); i++){
		if(strcmp(*name, builtin[i]) == 0) return false;
	}
	return true;
}

/* Makes a held key from its public half (taken, also on failure), keeping a copy of blob (the
 * provider's PEM of the private half, or NULL) and of the passphrase file. Returns 0 with *out,
 * or -1 with a reason. */
static int make_held(EVP_PKEY *pub, const char *uri, const char *store, const char *blob, size_t bloblen,
		const struct akz_key_opts *opts, struct akz_key **out, char *err, size_t errlen)
{
	enum akz_alg alg = choose_alg(pub, uri, err, errlen);
	if(alg == AKZ_ALG_NONE){
		EVP_PKEY_free(pub);
		return -1;
	}
	struct akz_key *k = wrap_pkey(pub, alg, uri, store, err, errlen);
	if(k == NULL) return -1;
	if(blob){
		k->blob = malloc(bloblen + 1);
		if(k->blob){
			memcpy(k->blob, blob, bloblen);
			k->blob[bloblen] = '\0';
			k->bloblen = bloblen;
		}
	}
	if(opts && opts->passphrase_file) k->passphrase_file = strdup(opts->passphrase_file);
	if((blob && k->blob == NULL) || (opts && opts->passphrase_file && k->passphrase_file == NULL)){
		akz_set_err(err, errlen, "%s: out of memory", uri);
		akz_key_unref(k);
		return -1;
	}
	*out = k;
	return 0;
}

/* A TSS2 PEM file's contents (buf, len bytes, read and checked by read_key_file), read without the
 * TPM (tss2.c). Returns 0 with *out, -1 with a reason, or 1 if buf holds no TSS2 key. */
static int load_tss2(const char *buf, size_t len, const char *uri, const struct akz_key_opts *opts,
		struct akz_key **out, char *err, size_t errlen)
{
	if(!akz_tss2_is_pem(buf)) return 1;
	char why[256];
	EVP_PKEY *pub = akz_tss2_public(buf, len, why, sizeof(why));
	if(pub == NULL){
		akz_set_err(err, errlen, "%s: %s", uri, why);
		return -1;
	}
	return make_held(pub, uri, "tpm2", buf, len, opts, out, err, errlen);
}

/* The private half of a held key, loaded into its device for one use. Key thread. Returns it
 * (free it as soon as possible: that unloads it from the device), or NULL with a reason. */
static EVP_PKEY *load_held_private(const struct akz_key *k, OSSL_LIB_CTX *libctx, char *err, size_t errlen)
{
	struct akz_key_opts o = {.passphrase_file = k->passphrase_file};
	if(k->blob == NULL) return load_pkey(k->uri, NULL, 0, &o, libctx, err, errlen);

	char why[256];
	EVP_PKEY *pkey = NULL;
	struct pass_state ps = {.file = k->passphrase_file};
	ERR_clear_error();
	OSSL_DECODER_CTX *dctx = OSSL_DECODER_CTX_new_for_pkey(&pkey, "PEM", NULL, NULL, EVP_PKEY_KEYPAIR,
			libctx, NULL);
	const unsigned char *data = (const unsigned char *)k->blob;
	size_t left = k->bloblen;
	if(dctx == NULL || OSSL_DECODER_CTX_set_pem_password_cb(dctx, passphrase_cb, &ps) != 1
			|| OSSL_DECODER_from_data(dctx, &data, &left) != 1 || pkey == NULL){
		akz_set_err(err, errlen, "%s: the TPM cannot load the key: %s", k->uri,
				ps.why[0] ? ps.why : akz_openssl_error(why, sizeof(why), false));
		EVP_PKEY_free(pkey);
		pkey = NULL;
	}
	OSSL_DECODER_CTX_free(dctx);
	return pkey;
}

/* Runs run(job) on the key thread, waiting at most its timeout. Returns true when it ran (the
 * caller frees job with free_job); false with "<name>: no answer ..." in err when it did not
 * answer in time (the key thread frees job when it is done: do not touch it). */
static bool call_on_key_thread(void (*run)(void *), void *job, void (*free_job)(void *), const char *name,
		char *err, size_t errlen)
{
	int timeout = akz_keythread_timeout_ms();
	if(akz_kjob_call(run, job, free_job, timeout)) return true;
	akz_set_err(err, errlen, "%s: no answer from the key's device within %d ms", name, timeout);
	return false;
}

/* What a job that makes a key (a load, a generation) leaves for its caller. */
struct key_result {
	struct akz_key *key;         /* the key, or NULL ... */
	char err[512];               /* ... and why */
};

/* call_on_key_thread for a job that makes a key into *res (a member of job). Returns 0 with
 * *out (the caller's reference), or -1 with a reason. Takes job: frees it, or after a timeout
 * leaves it to the key thread, which frees it when the job is done. */
static int make_key_on_key_thread(void (*run)(void *), void *job, void (*free_job)(void *),
		struct key_result *res, const char *name, struct akz_key **out, char *err, size_t errlen)
{
	if(!call_on_key_thread(run, job, free_job, name, err, errlen)) return -1;
	*out = res->key;
	res->key = NULL;
	if(*out == NULL) akz_set_err(err, errlen, "%s", res->err);
	free_job(job);
	return *out ? 0 : -1;
}

struct load_job {
	char *uri;
	char *passphrase_file;
	bool allow_group_readable;
	struct key_result res;
};

static void free_load_job(void *arg)
{
	struct load_job *j = arg;
	akz_key_unref(j->res.key);
	free(j->uri);
	free(j->passphrase_file);
	free(j);
}

/* Loads a key by URI in the key thread's library context. Key thread. */
static void run_load(void *arg)
{
	struct load_job *j = arg;
	struct akz_key_opts o = {.passphrase_file = j->passphrase_file, .allow_group_readable = j->allow_group_readable};
	OSSL_LIB_CTX *libctx;
	char why[400];
	if(akz_keythread_libctx(NULL, &libctx, why, sizeof(why))){
		akz_set_err(j->res.err, sizeof(j->res.err), "%s: %s", j->uri, why);
		return;
	}
	EVP_PKEY *pkey = load_pkey(j->uri, NULL, 0, &o, libctx, j->res.err, sizeof(j->res.err));
	if(pkey == NULL){
		akz_keythread_failed();
		return;
	}
	const char *store;
	if(!held_in_device(pkey, &store)){
		/* It would live in the key thread's library context, which is made again after a
		 * provider failure: keys in memory come from files. */
		akz_set_err(j->res.err, sizeof(j->res.err), "%s: the %s provider holds this key in memory: name a "
				"key file by its path, and URIs for keys in a device", j->uri, store);
		EVP_PKEY_free(pkey);
		return;
	}
	EVP_PKEY *pub = public_copy(pkey);
	EVP_PKEY_free(pkey);          /* out of the device again */
	if(pub == NULL){
		akz_set_err(j->res.err, sizeof(j->res.err), "%s: cannot read the public key", j->uri);
		return;
	}
	make_held(pub, j->uri, store, NULL, 0, &o, &j->res.key, j->res.err, sizeof(j->res.err));
}

/* A key named by a provider URI (handle:0x81000001, ...): loaded on the key thread, which may
 * have to ask the device. Returns 0 with *out, or -1 with a reason. */
static int load_held_uri(const char *uri, const struct akz_key_opts *opts, struct akz_key **out,
		char *err, size_t errlen)
{
	struct load_job *j = calloc(1, sizeof(*j));
	if(j == NULL || (j->uri = strdup(uri)) == NULL
			|| (opts && opts->passphrase_file && (j->passphrase_file = strdup(opts->passphrase_file)) == NULL)){
		if(j) free_load_job(j);
		akz_set_err(err, errlen, "%s: out of memory", uri);
		return -1;
	}
	j->allow_group_readable = opts && opts->allow_group_readable;
	return make_key_on_key_thread(run_load, j, free_load_job, &j->res, uri, out, err, errlen);
}

struct sign_job {
	struct akz_key *key;
	unsigned char digest[32];    /* signs this digest ... */
	X509 *cert;                  /* ... or, if set, this certificate (owned) */
	unsigned char sig[1024];
	size_t siglen;
	int rc;
	char err[512];
};

static void free_sign_job(void *arg)
{
	struct sign_job *j = arg;
	X509_free(j->cert);
	akz_key_unref(j->key);
	free(j);
}

/* Signs j->cert with pkey, through the provider holding it. Returns 1, or 0. */
static int sign_cert_with(OSSL_LIB_CTX *libctx, EVP_PKEY *pkey, X509 *cert)
{
	const OSSL_PROVIDER *prov = EVP_PKEY_get0_provider(pkey);
	char propq[64] = "";
	if(prov) snprintf(propq, sizeof(propq), "?provider=%s", OSSL_PROVIDER_get0_name(prov));
	EVP_MD_CTX *mctx = EVP_MD_CTX_new();
	int ok = mctx && EVP_DigestSignInit_ex(mctx, NULL, "SHA256", libctx, propq[0] ? propq : NULL, pkey, NULL) == 1
			&& X509_sign_ctx(cert, mctx) > 0;
	EVP_MD_CTX_free(mctx);
	return ok;
}

/* Signs j->digest (or j->cert) with the held key: load it into the device, check that it is
 * still the key the kid was taken from, sign, unload. Key thread. */
static void run_sign(void *arg)
{
	struct sign_job *j = arg;
	const struct akz_key *k = j->key;
	OSSL_LIB_CTX *libctx;
	char why[400];

	j->rc = -1;
	if(akz_keythread_libctx(k->store, &libctx, why, sizeof(why))){
		akz_set_err(j->err, sizeof(j->err), "%s: %s", k->uri, why);
		akz_keythread_failed();
		return;
	}
	EVP_PKEY *pkey = load_held_private(k, libctx, j->err, sizeof(j->err));
	if(pkey == NULL){
		akz_keythread_failed();
		return;
	}
	EVP_PKEY *pub = public_copy(pkey);
	if(pub == NULL || EVP_PKEY_eq(pub, k->pkey) != 1){
		/* A persistent handle can be given to another key: never sign with that one. */
		akz_set_err(j->err, sizeof(j->err), "%s: the device now holds another key under this name "
				"(not kid %s)", k->uri, k->kid);
	}else{
		ERR_clear_error();
		if(j->cert){
			if(sign_cert_with(libctx, pkey, j->cert)) j->rc = 0;
		}else{
			EVP_PKEY_CTX *ctx = new_sign_ctx(libctx, pkey, k->alg);
			j->siglen = sizeof(j->sig);
			if(ctx && EVP_PKEY_sign(ctx, j->sig, &j->siglen, j->digest, 32) == 1) j->rc = 0;
			EVP_PKEY_CTX_free(ctx);
		}
		if(j->rc){
			akz_set_err(j->err, sizeof(j->err), "%s: the TPM did not sign: %s", k->uri,
					akz_openssl_error(why, sizeof(why), false));
		}
	}
	EVP_PKEY_free(pub);
	EVP_PKEY_free(pkey);
	if(j->rc) akz_keythread_failed();
	ERR_clear_error();
}

/* Runs the signing job j (taken) for key on the key thread, waiting at most its timeout.
 * Returns j, done and signed (the caller frees it with free_sign_job), or NULL with a reason. */
static struct sign_job *call_sign(const struct akz_key *key, struct sign_job *j, char *err, size_t errlen)
{
	j->key = akz_key_ref((struct akz_key *)key);
	if(!call_on_key_thread(run_sign, j, free_sign_job, key->uri, err, errlen)) return NULL;
	if(j->rc){
		akz_set_err(err, errlen, "%s", j->err);
		free_sign_job(j);
		return NULL;
	}
	return j;
}

/* akz_key_sign_digest for a held key: on the key thread, waiting at most its timeout. */
static int sign_held(const struct akz_key *key, const unsigned char digest[32], unsigned char *sig,
		size_t *siglen, char *err, size_t errlen)
{
	struct sign_job *j = calloc(1, sizeof(*j));
	if(j == NULL){
		akz_set_err(err, errlen, "%s: out of memory", key->uri);
		return -1;
	}
	memcpy(j->digest, digest, 32);
	if((j = call_sign(key, j, err, errlen)) == NULL) return -1;
	int rc = 0;
	if(j->siglen <= *siglen){
		memcpy(sig, j->sig, j->siglen);
		*siglen = j->siglen;
	}else{
		akz_set_err(err, errlen, "%s: signature too long", key->uri);
		rc = -1;
	}
	free_sign_job(j);
	return rc;
}

int akz_key_sign_x509(const struct akz_key *key, X509 **cert, char *err, size_t errlen)
{
	if(!key->held){
		int ok = X509_sign(*cert, key->pkey, EVP_sha256()) > 0;
		ERR_clear_error();
		if(!ok) akz_set_err(err, errlen, "%s: the signature failed", key->uri);
		return ok ? 0 : -1;
	}
	/* The job takes the certificate: after a timeout it may still be running. */
	struct sign_job *j = calloc(1, sizeof(*j));
	if(j == NULL){
		akz_set_err(err, errlen, "%s: out of memory", key->uri);
		return -1;
	}
	j->cert = *cert;
	*cert = NULL;
	if((j = call_sign(key, j, err, errlen)) == NULL) return -1;
	*cert = j->cert;
	j->cert = NULL;
	free_sign_job(j);
	return 0;
}

struct gen_job {
	char store[32];
	enum akz_alg alg;
	int bits;
	struct key_result res;
};

static void free_gen_job(void *arg)
{
	struct gen_job *j = arg;
	akz_key_unref(j->res.key);
	free(j);
}

/* Generates a key inside the provider j->store and keeps its PEM (a TSS2 blob for tpm2). Key
 * thread. */
static void run_generate(void *arg)
{
	struct gen_job *j = arg;
	OSSL_LIB_CTX *libctx;
	char why[400], propq[64];
	EVP_PKEY *pkey = NULL;
	BIO *bio = NULL;

	if(akz_keythread_libctx(j->store, &libctx, why, sizeof(why))){
		akz_set_err(j->res.err, sizeof(j->res.err), "%s", why);
		return;
	}
	snprintf(propq, sizeof(propq), "provider=%s", j->store);
	ERR_clear_error();
	EVP_PKEY_CTX *gctx = EVP_PKEY_CTX_new_from_name(libctx, j->alg == AKZ_ALG_ES256 ? "EC" : "RSA", propq);
	if(gctx == NULL || EVP_PKEY_keygen_init(gctx) != 1
			|| (j->alg == AKZ_ALG_ES256 ? EVP_PKEY_CTX_set_group_name(gctx, "P-256")
				: EVP_PKEY_CTX_set_rsa_keygen_bits(gctx, j->bits)) != 1
			|| EVP_PKEY_generate(gctx, &pkey) != 1){
		akz_set_err(j->res.err, sizeof(j->res.err), "%s cannot generate the key: %s%s", j->store,
				gctx ? "" : "no such provider loaded, or it makes no such keys: ",
				akz_openssl_error(why, sizeof(why), false));
		goto out;
	}
	char *data = NULL;
	long n = 0;
	EVP_PKEY *pub = public_copy(pkey);
	bio = BIO_new(BIO_s_mem());
	if(pub == NULL || bio == NULL || PEM_write_bio_PrivateKey(bio, pkey, NULL, NULL, 0, NULL, NULL) != 1
			|| (n = BIO_get_mem_data(bio, &data)) <= 0){
		EVP_PKEY_free(pub);
		akz_set_err(j->res.err, sizeof(j->res.err), "%s made the key but cannot export its blob: %s", j->store,
				akz_openssl_error(why, sizeof(why), false));
		goto out;
	}
	make_held(pub, "(generated)", j->store, data, (size_t)n, NULL, &j->res.key, j->res.err, sizeof(j->res.err));
out:
	if(j->res.key == NULL) akz_keythread_failed();
	BIO_free(bio);
	EVP_PKEY_free(pkey);
	EVP_PKEY_CTX_free(gctx);
	ERR_clear_error();
}

int akz_key_generate_in(const char *store, enum akz_alg alg, int bits, struct akz_key **out,
		char *err, size_t errlen)
{
	*out = NULL;
	if(alg == AKZ_ALG_RS256 && bits != 2048 && bits != 3072 && bits != 4096){
		akz_set_err(err, errlen, "RSA key size %d: use 2048, 3072 or 4096", bits);
		return -1;
	}
	if(alg != AKZ_ALG_RS256 && alg != AKZ_ALG_ES256){
		akz_set_err(err, errlen, "unknown key type");
		return -1;
	}
	struct gen_job *j = calloc(1, sizeof(*j));
	if(j == NULL){
		akz_set_err(err, errlen, "out of memory");
		return -1;
	}
	snprintf(j->store, sizeof(j->store), "%s", store);
	j->alg = alg;
	j->bits = bits;
	return make_key_on_key_thread(run_generate, j, free_gen_job, &j->res, store, out, err, errlen);
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
		return load_held_uri(uri, opts, out, err, errlen);
	case AKZ_KEYREF_PATH: {
		size_t len = 0;
		char *buf = read_key_file(path, true, opts, &len, err, errlen);
		if(buf == NULL) return -1;
		pkey = decode_plain_pem(buf, len);
		int rc = pkey ? 1 : load_tss2(buf, len, uri, opts, out, err, errlen);
		if(rc == 1 && pkey == NULL) pkey = load_pkey(uri, buf, len, opts, NULL, err, errlen);
		OPENSSL_clear_free(buf, len + 1);
		if(rc != 1) return rc;
		break;
	}
	}
	if(pkey == NULL) return -1;
	enum akz_alg alg = choose_alg(pkey, uri, err, errlen);
	if(alg == AKZ_ALG_NONE){
		EVP_PKEY_free(pkey);
		return -1;
	}
	*out = wrap_pkey(pkey, alg, uri, NULL, err, errlen);
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
	if(key->blob) OPENSSL_clear_free(key->blob, key->bloblen + 1);
	free(key->passphrase_file);
	free(key->uri);
	free(key);
}

enum akz_alg akz_key_alg(const struct akz_key *key) { return key->alg; }
const char *akz_key_kid(const struct akz_key *key) { return key->kid; }
const char *akz_key_uri(const struct akz_key *key) { return key->uri; }
EVP_PKEY *akz_key_pkey(const struct akz_key *key) { return key->pkey; }
const char *akz_key_header_b64(const struct akz_key *key) { return key->header_b64; }

int akz_key_sign_digest(const struct akz_key *key, const unsigned char digest[32],
		unsigned char *sig, size_t *siglen, char *err, size_t errlen)
{
	if(key->held) return sign_held(key, digest, sig, siglen, err, errlen);
	struct akz_key *k = (struct akz_key *)key;   /* the lock and the context are mutable state */
	pthread_mutex_lock(&k->sign_lock);
	int ok = EVP_PKEY_sign(k->sign_ctx, sig, siglen, digest, 32);
	pthread_mutex_unlock(&k->sign_lock);
	if(ok != 1) akz_set_err(err, errlen, "%s: the signature failed", key->uri);
	ERR_clear_error();
	return ok == 1 ? 0 : -1;
}

bool akz_key_held(const struct akz_key *key) { return key->held; }
const char *akz_key_store(const struct akz_key *key) { return key->held ? key->store : "file"; }

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
	*out = wrap_pkey(pkey, alg, "(generated)", NULL, err, errlen);
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

/* Writes the public PEM of key to path (mode 0644). Returns 0, or -1 with a reason. */
static int write_public(const struct akz_key *key, const char *path, char *err, size_t errlen)
{
	char *pem = akz_key_public_pem(key);
	if(pem == NULL){
		akz_set_err(err, errlen, "%s: cannot encode the public key", path);
		return -1;
	}
	int rc = write_new_file(path, pem, strlen(pem), 0644, err, errlen);
	free(pem);
	return rc;
}

/* akz_key_write for a key generated in a device: its blob (useless without that device, but
 * kept as private as a key file) and the public key; the key then names the file it is in. */
static int write_held(const struct akz_key *key, const char *priv_path, const char *pub_path,
		char *err, size_t errlen)
{
	if(key->blob == NULL){
		akz_set_err(err, errlen, "%s: the key is in %s and has no blob to write", priv_path, key->store);
		return -1;
	}
	if(write_new_file(priv_path, key->blob, key->bloblen, 0600, err, errlen)) return -1;
	char *uri = strdup(priv_path);
	if(uri){
		struct akz_key *k = (struct akz_key *)key;   /* not yet shared: see the contract */
		free(k->uri);
		k->uri = uri;
	}
	return pub_path ? write_public(key, pub_path, err, errlen) : 0;
}

int akz_key_write(const struct akz_key *key, const char *priv_path, const char *pub_path,
		char *err, size_t errlen)
{
	if(key->held) return write_held(key, priv_path, pub_path, err, errlen);
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
	return write_public(key, pub_path, err, errlen);
}
