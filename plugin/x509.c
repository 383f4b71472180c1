/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* x509.c - self-signed X.509 certificates of device keys, the credential form akenza calls
 * RSA256_X509_PEM / EC256_X509_PEM. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include "akz_util.h"
#include "akz_x509.h"

#define CN_MAX 64   /* ub-common-name, RFC 5280 */

/* Gives x a random positive serial of 127 bits (RFC 5280 allows up to 20 octets). Returns 0 or -1. */
static int set_random_serial(X509 *x)
{
	unsigned char rnd[16];
	if(RAND_bytes(rnd, sizeof(rnd)) != 1) return -1;
	rnd[0] &= 0x7F;
	rnd[0] |= 0x40;   /* a fixed length: no leading zero octet to strip */
	BIGNUM *bn = BN_bin2bn(rnd, sizeof(rnd), NULL);
	int ok = bn && BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(x)) != NULL;
	BN_free(bn);
	return ok ? 0 : -1;
}

/* Subject and issuer CN=cn. Returns 0, or -1 (cn not encodable). */
static int set_names(X509 *x, const char *cn)
{
	X509_NAME *name = X509_NAME_new();
	int ok = name && X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8, (const unsigned char *)cn, -1, -1, 0) == 1
			&& X509_set_subject_name(x, name) == 1 && X509_set_issuer_name(x, name) == 1;
	X509_NAME_free(name);
	return ok ? 0 : -1;
}

/* Adds the extensions of a device certificate, each as its config line. The subject key
 * identifier goes first: the authority key identifier copies it. Returns 0 or -1. */
static int add_extensions(X509 *x)
{
	static const struct { int nid; const char *value; } exts[] = {
		{NID_basic_constraints, "critical,CA:FALSE"},
		{NID_key_usage, "critical,digitalSignature"},
		{NID_subject_key_identifier, "hash"},
		{NID_authority_key_identifier, "keyid:always"},
	};
	X509V3_CTX ctx;
	X509V3_set_ctx(&ctx, x, x, NULL, NULL, 0);
	for(size_t i = 0; i < sizeof(exts)/sizeof(exts[0]); i++){
		X509_EXTENSION *e = X509V3_EXT_conf_nid(NULL, &ctx, exts[i].nid, exts[i].value);
		int ok = e && X509_add_ext(x, e, -1) == 1;
		X509_EXTENSION_free(e);
		if(!ok) return -1;
	}
	return 0;
}

/* The certificate as PEM text (caller frees), or NULL. */
static char *to_pem(X509 *x)
{
	BIO *bio = BIO_new(BIO_s_mem());
	char *out = NULL, *data;
	if(bio && PEM_write_bio_X509(bio, x) == 1){
		long n = BIO_get_mem_data(bio, &data);
		if(n > 0 && (out = malloc((size_t)n + 1)) != NULL){
			memcpy(out, data, (size_t)n);
			out[n] = '\0';
		}
	}
	BIO_free(bio);
	return out;
}

char *akz_x509_self_signed(const struct akz_key *key, const char *cn, int days, char *err, size_t errlen)
{
	size_t cnlen = strlen(cn);
	if(cnlen == 0 || cnlen > CN_MAX){
		akz_set_err(err, errlen, "certificate for '%.80s': a common name is 1 to %d characters", cn, CN_MAX);
		return NULL;
	}
	if(days < 1 || days > AKZ_X509_DAYS_MAX){
		akz_set_err(err, errlen, "certificate validity of %d days is outside 1..%d", days, AKZ_X509_DAYS_MAX);
		return NULL;
	}
	EVP_PKEY *pkey = akz_key_pkey(key);
	X509 *x = X509_new();
	char *pem = NULL;
	const char *step = "out of memory";
	char why[300];
	if(x == NULL) goto out;
	step = "building it";
	if(X509_set_version(x, X509_VERSION_3) != 1 || set_random_serial(x)
			|| X509_gmtime_adj(X509_getm_notBefore(x), 0) == NULL
			|| X509_time_adj_ex(X509_getm_notAfter(x), days, 0, NULL) == NULL
			|| X509_set_pubkey(x, pkey) != 1){
		goto out;
	}
	step = "the common name is not valid UTF-8";
	if(set_names(x, cn)) goto out;
	step = "adding its extensions";
	if(add_extensions(x)) goto out;
	if(akz_key_sign_x509(key, &x, why, sizeof(why))){   /* a key in a TPM signs there */
		step = why;
		goto out;
	}
	step = "out of memory";
	pem = to_pem(x);
out:
	if(pem == NULL) akz_set_err(err, errlen, "certificate for '%s': %s", cn, step);
	X509_free(x);
	return pem;
}
