/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* passwd.c - verifying and making password hashes in mosquitto_passwd's $6$ and $7$ formats. */
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include "akz_util.h"
#include "akz_passwd.h"

/* The check runs on the broker thread, which serves every client: a hash it accepts is a stall it
 * accepts at every login with a wrong password (the cache only holds successes). 10,000,000
 * iterations (the bound until the fuzzer flagged it) cost ~4 s of PBKDF2-HMAC-SHA512 per attempt,
 * so five wrong guesses froze the broker for 20 s; 1,000,000 (~0.4 s here) is five times OWASP's
 * figure and still bounds the stall. */
#define ITERATIONS_MAX AKZ_PW_ITERATIONS_MAX

/* Decodes exactly `want` bytes of standard base64 (padding allowed) from s[0..len).
 * Returns 0, or -1 if s is not valid base64 of that length. */
static int decode_b64_exact(const char *s, size_t len, unsigned char *out, size_t want)
{
	unsigned char buf[128];
	if(len == 0 || len % 4 != 0 || len / 4 * 3 > sizeof(buf)) return -1;
	for(size_t i = 0; i < len; i++){
		char c = s[i];
		bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9')
				|| c == '+' || c == '/' || (c == '=' && i >= len - 2);
		if(!ok) return -1;
	}
	int n = EVP_DecodeBlock(buf, (const unsigned char *)s, (int)len);
	if(n < 0) return -1;
	size_t pad = (s[len-1] == '=') + (s[len-2] == '=');
	if(pad == 1 && s[len-2] == '=') return -1;   /* "x=" followed by a non-'=' is malformed */
	if((size_t)n - pad != want) return -1;
	memcpy(out, buf, want);
	OPENSSL_cleanse(buf, sizeof(buf));
	return 0;
}

/* Decodes a salt of either length mosquitto_passwd writes (12 bytes in 2.0, 64 in 2.1) into pw.
 * Returns 0, or -1 if s is neither. */
static int decode_salt(const char *s, size_t len, struct akz_pw *pw)
{
	const size_t lens[] = {AKZ_PW_SALT_LEN, AKZ_PW_SALT_MAX};
	for(size_t i = 0; i < sizeof(lens)/sizeof(lens[0]); i++){
		if(decode_b64_exact(s, len, pw->salt, lens[i]) == 0){
			pw->salt_len = lens[i];
			return 0;
		}
	}
	return -1;
}

/* Splits "$<k>$a$b[$c]" into up to 3 fields after the scheme. Returns the field count. */
static int split_fields(const char *text, const char *f[3], size_t flen[3])
{
	const char *p = text + 3;
	int n = 0;
	while(n < 3){
		const char *end = strchr(p, '$');
		f[n] = p;
		flen[n] = end ? (size_t)(end - p) : strlen(p);
		n++;
		if(end == NULL) return n;
		p = end + 1;
	}
	return n + 1;   /* more fields than any scheme has */
}

int akz_pw_parse(const char *text, struct akz_pw *out, char *err, size_t errlen)
{
	const char *f[3];
	size_t flen[3];

	memset(out, 0, sizeof(*out));
	if(text && strncmp(text, "$argon2id$", 10) == 0){
		akz_set_err(err, errlen, "an argon2id hash (mosquitto_passwd -H argon2id) is not supported: "
				"make a $7$ hash (mosquitto_passwd -H sha512-pbkdf2, or 'akenzactl passwd')");
		return -1;
	}
	if(text == NULL || text[0] != '$' || (text[1] != '6' && text[1] != '7') || text[2] != '$'){
		akz_set_err(err, errlen, "not a password hash ($6$ or $7$, as mosquitto_passwd or "
				"'akenzactl passwd' write them): plain-text passwords are refused");
		return -1;
	}
	int n = split_fields(text, f, flen);
	if(text[1] == '6'){
		out->kind = AKZ_PW_SHA512;
		out->iterations = 1;
		if(n != 2 || decode_salt(f[0], flen[0], out)
				|| decode_b64_exact(f[1], flen[1], out->hash, AKZ_PW_HASH_LEN)){
			akz_set_err(err, errlen, "malformed $6$ hash: expected $6$<base64 salt of 12 or 64 bytes>$<base64 hash of 64 bytes>");
			return -1;
		}
		return 0;
	}
	out->kind = AKZ_PW_PBKDF2;
	char num[16];
	if(n != 3 || flen[0] == 0 || flen[0] >= sizeof(num) || strspn(f[0], "0123456789") < flen[0]){
		akz_set_err(err, errlen, "malformed $7$ hash: expected $7$<iterations>$<base64 salt>$<base64 hash>");
		return -1;
	}
	memcpy(num, f[0], flen[0]);
	num[flen[0]] = '\0';
	long it = strtol(num, NULL, 10);
	if(it < 1 || it > ITERATIONS_MAX){
		akz_set_err(err, errlen, "$7$ hash: %ld iterations is outside 1..%d", it, ITERATIONS_MAX);
		return -1;
	}
	out->iterations = (int)it;
	if(decode_salt(f[1], flen[1], out) || decode_b64_exact(f[2], flen[2], out->hash, AKZ_PW_HASH_LEN)){
		akz_set_err(err, errlen, "malformed $7$ hash: salt must be 12 or 64 bytes and hash 64 bytes, in base64");
		return -1;
	}
	return 0;
}

/* Computes the hash of password with pw's scheme, salt and iterations into out. */
static int compute(const struct akz_pw *pw, const char *password, unsigned char out[AKZ_PW_HASH_LEN])
{
	size_t len = strlen(password);
	if(pw->kind == AKZ_PW_SHA512){
		EVP_MD_CTX *ctx = EVP_MD_CTX_new();
		unsigned int n = 0;
		int ok = ctx && EVP_DigestInit_ex(ctx, EVP_sha512(), NULL) == 1
				&& EVP_DigestUpdate(ctx, password, len) == 1
				&& EVP_DigestUpdate(ctx, pw->salt, pw->salt_len) == 1
				&& EVP_DigestFinal_ex(ctx, out, &n) == 1 && n == AKZ_PW_HASH_LEN;
		EVP_MD_CTX_free(ctx);
		return ok ? 0 : -1;
	}
	if(len > INT32_MAX) return -1;
	return PKCS5_PBKDF2_HMAC(password, (int)len, pw->salt, (int)pw->salt_len, pw->iterations,
			EVP_sha512(), AKZ_PW_HASH_LEN, out) == 1 ? 0 : -1;
}

bool akz_pw_verify(const struct akz_pw *pw, const char *password)
{
	unsigned char h[AKZ_PW_HASH_LEN];
	if(password == NULL || compute(pw, password, h)) return false;
	bool ok = CRYPTO_memcmp(h, pw->hash, sizeof(h)) == 0;
	OPENSSL_cleanse(h, sizeof(h));
	return ok;
}

/* Standard base64 with padding into out (size >= 4*ceil(len/3)+1). */
static void encode_b64(const unsigned char *in, size_t len, char *out)
{
	EVP_EncodeBlock((unsigned char *)out, in, (int)len);
}

char *akz_pw_hash(const char *password, int iterations, char *err, size_t errlen)
{
	/* A 12-byte salt, which Mosquitto 2.0's password_file reads as well as 2.1's. */
	struct akz_pw pw = {.kind = AKZ_PW_PBKDF2, .iterations = iterations, .salt_len = AKZ_PW_SALT_LEN};
	if(iterations < 1 || iterations > ITERATIONS_MAX){
		akz_set_err(err, errlen, "iterations %d outside 1..%d", iterations, ITERATIONS_MAX);
		return NULL;
	}
	if(password == NULL || password[0] == '\0'){
		akz_set_err(err, errlen, "empty password");
		return NULL;
	}
	if(RAND_bytes(pw.salt, (int)pw.salt_len) != 1 || compute(&pw, password, pw.hash)){
		akz_set_err(err, errlen, "hashing failed");
		return NULL;
	}
	char salt[32], hash[96];
	encode_b64(pw.salt, pw.salt_len, salt);
	encode_b64(pw.hash, sizeof(pw.hash), hash);
	OPENSSL_cleanse(&pw, sizeof(pw));
	size_t n = strlen(salt) + strlen(hash) + 32;
	char *out = malloc(n);
	if(out == NULL){
		akz_set_err(err, errlen, "out of memory");
		return NULL;
	}
	snprintf(out, n, "$7$%d$%s$%s", iterations, salt, hash);
	return out;
}
