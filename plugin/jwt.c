/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* jwt.c - minting akenza device JWTs: header and claims as PyJWT writes them, RS256 or ES256. */
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include "akz_util.h"
#include "akz_jwt.h"
#include "akz_keystore_int.h"

#define SIG_MAX 1024    /* RSA 8192 */

static pthread_once_t sha256_once = PTHREAD_ONCE_INIT;
static EVP_MD *sha256_md;

/* OpenSSL 3 looks an algorithm up on every EVP_sha256() use; fetching it once saves that
 * lookup on each token. */
static void fetch_sha256(void)
{
	/* Preferably OpenSSL's own: a TPM's provider loaded beside it (OPENSSL_CONF) also offers
	 * SHA256, one device round trip per use. */
	sha256_md = EVP_MD_fetch(NULL, "SHA256", "?provider=default");
}

/* The plugin can be unloaded before the process ends: give the digest back then. */
__attribute__((destructor)) static void free_sha256(void)
{
	EVP_MD_free(sha256_md);
	sha256_md = NULL;
}

static const EVP_MD *sha256(void)
{
	pthread_once(&sha256_once, fetch_sha256);
	return sha256_md ? sha256_md : EVP_sha256();
}

/* base64url without padding (RFC 7515 §2) of len bytes into out, which must hold
 * 4*ceil(len/3)+1 bytes. Returns the length written (NUL not counted). Never fails. */
static size_t b64url(const unsigned char *in, size_t len, char *out)
{
	static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
	size_t o = 0, i = 0;
	for(; i + 2 < len; i += 3){
		uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i+1] << 8 | in[i+2];
		out[o++] = tab[v >> 18];
		out[o++] = tab[(v >> 12) & 63];
		out[o++] = tab[(v >> 6) & 63];
		out[o++] = tab[v & 63];
	}
	if(i < len){
		uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < len ? (uint32_t)in[i+1] << 8 : 0);
		out[o++] = tab[v >> 18];
		out[o++] = tab[(v >> 12) & 63];
		if(i + 1 < len) out[o++] = tab[(v >> 6) & 63];
	}
	out[o] = '\0';
	return o;
}

/* Writes id as the inside of a JSON string into out (size outlen), escaping '"' and '\\'.
 * Returns the length, or -1 with a reason: control characters and invalid UTF-8 are refused,
 * since no akenza device id carries them and a token must not depend on an escaping choice. */
static int json_escape_id(const char *id, char *out, size_t outlen, char *err, size_t errlen)
{
	const unsigned char *s = (const unsigned char *)id;
	size_t o = 0;
	const char *why = akz_text_bad_reason(id);
	if(why){
		akz_set_err(err, errlen, "device id %s", why);
		return -1;
	}
	while(*s){
		size_t n = akz_utf8_seq_len(s);
		bool esc = (*s == '"' || *s == '\\');
		if(o + n + esc + 1 > outlen){
			akz_set_err(err, errlen, "device id too long");
			return -1;
		}
		if(esc) out[o++] = '\\';
		memcpy(out + o, s, n);
		o += n;
		s += n;
	}
	out[o] = '\0';
	return (int)o;
}

/* Reads one DER INTEGER at *p (end exclusive) into a 32-byte big-endian field. Returns 0 and
 * advances *p, or -1 if it is not a positive INTEGER of at most 32 significant bytes. */
static int der_int_to_32(const unsigned char **p, const unsigned char *end, unsigned char out[32])
{
	const unsigned char *q = *p;
	if(end - q < 2 || q[0] != 0x02 || q[1] > 33 || q[1] == 0 || end - q - 2 < q[1]) return -1;
	size_t len = q[1];
	q += 2;
	*p = q + len;
	while(len > 0 && *q == 0){   /* a leading zero keeps a high bit from meaning "negative" */
		q++;
		len--;
	}
	if(len > 32) return -1;
	memset(out, 0, 32 - len);
	memcpy(out + 32 - len, q, len);
	return 0;
}

/* Converts a DER ECDSA-Sig-Value (SEQUENCE of two INTEGERs, short form: at most 72 bytes for
 * P-256) into JWS's fixed 64-byte r||s. Parsed by hand: this runs for every ES256 token and
 * d2i_ECDSA_SIG would allocate two bignums each time. Returns 0, or -1 if malformed. */
static int der_to_raw_p256(const unsigned char *der, size_t derlen, unsigned char raw[64])
{
	if(derlen < 8 || der[0] != 0x30 || der[1] != derlen - 2) return -1;
	const unsigned char *p = der + 2, *end = der + derlen;
	if(der_int_to_32(&p, end, raw) || der_int_to_32(&p, end, raw + 32)) return -1;
	return p == end ? 0 : -1;
}

const char *akz_jwt_bad_audience(const char *audience)
{
	static const char allowed[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-:";
	size_t n = strlen(audience);
	if(n == 0) return "is empty";
	if(n > AKZ_AUDIENCE_MAX) return "is longer than 253 characters";
	if(strspn(audience, allowed) != n) return "may hold only letters, digits, '.', '-' and ':' (a host name, as in <customer>.akenza.io)";
	if(audience[0] == '.' || audience[0] == '-' || audience[0] == ':') return "must start with a letter or digit";
	return NULL;
}

size_t akz_jwt_header_b64(enum akz_alg alg, const char *kid, char *out, size_t outlen)
{
	char header[160];
	int hlen = snprintf(header, sizeof(header), "{\"alg\":\"%s\",\"kid\":\"%s\",\"typ\":\"JWT\"}",
			akz_alg_name(alg), kid);
	if(hlen < 0 || (size_t)hlen >= sizeof(header) || outlen < 4 * ((size_t)hlen + 2) / 3 + 1) return 0;
	return b64url((const unsigned char *)header, (size_t)hlen, out);
}

char *akz_jwt_mint(const struct akz_key *key, const char *audience, const char *device_id, time_t iat,
		long lifetime, char *err, size_t errlen)
{
	if(audience == NULL) audience = AKZ_AUDIENCE_DEFAULT;
	const char *why = akz_jwt_bad_audience(audience);
	if(why){
		akz_set_err(err, errlen, "audience '%.64s' %s", audience, why);
		return NULL;
	}
	if(lifetime < AKZ_JWT_LIFETIME_MIN || lifetime > AKZ_JWT_LIFETIME_MAX){
		akz_set_err(err, errlen, "token lifetime %ld s is outside %d..%d", lifetime,
				AKZ_JWT_LIFETIME_MIN, AKZ_JWT_LIFETIME_MAX);
		return NULL;
	}
	if(device_id == NULL || device_id[0] == '\0'){
		akz_set_err(err, errlen, "empty device id");
		return NULL;
	}
	char id[512];
	if(json_escape_id(device_id, id, sizeof(id), err, errlen) < 0) return NULL;

	/* The same bytes PyJWT writes: header keys sorted (encoded once per key, at load), claims
	 * in the reference client's order. */
	const char *hdr = akz_key_header_b64(key);
	size_t hlen = strlen(hdr);
	char claims[1000];
	int clen = snprintf(claims, sizeof(claims), "{\"iat\":%lld,\"exp\":%lld,\"aud\":\"https://%s/devices/%s\"}",
			(long long)iat, (long long)iat + lifetime, audience, id);
	if(clen < 0 || (size_t)clen >= sizeof(claims)){
		akz_set_err(err, errlen, "token claims too long");
		return NULL;
	}
	size_t cap = hlen + 4 * ((size_t)clen + 2) / 3 + 4 * (SIG_MAX + 2) / 3 + 4;
	char *tok = malloc(cap);
	if(tok == NULL){
		akz_set_err(err, errlen, "out of memory");
		return NULL;
	}
	memcpy(tok, hdr, hlen);   /* NOLINT(bugprone-not-null-terminated-result): the claims follow */
	size_t n = hlen;
	tok[n++] = '.';
	n += b64url((const unsigned char *)claims, (size_t)clen, tok + n);

	unsigned char digest[32], sig[SIG_MAX], raw[64];
	unsigned int dlen = 0;
	size_t siglen = sizeof(sig);
	char reason[512];
	if(EVP_Digest(tok, n, digest, &dlen, sha256(), NULL) != 1){
		akz_set_err(err, errlen, "SHA-256 failed");
		free(tok);
		return NULL;
	}
	if(akz_key_sign_digest(key, digest, sig, &siglen, reason, sizeof(reason)) != 0){
		akz_set_err(err, errlen, "signing failed: %s", reason);
		free(tok);
		return NULL;
	}
	const unsigned char *s = sig;
	if(akz_key_alg(key) == AKZ_ALG_ES256){
		if(der_to_raw_p256(sig, siglen, raw)){
			akz_set_err(err, errlen, "malformed ECDSA signature");
			free(tok);
			return NULL;
		}
		s = raw;
		siglen = 64;
	}
	tok[n++] = '.';
	b64url(s, siglen, tok + n);
	return tok;
}
