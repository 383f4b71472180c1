/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* tss2.c - the public half of a TPM key blob ("TSS2 PRIVATE KEY" PEM), read without the TPM. */
#include <stdint.h>
#include <string.h>
#include <openssl/asn1.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/objects.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>
#include "akz_tss2.h"
#include "akz_util.h"

/* A TSS2 PEM holds (draft-bottomley-tpm2-keys) SEQUENCE { type OID, [0] emptyAuth BOOLEAN,
 * [1] policy, [2] secret, [3] authPolicy (all optional), parent INTEGER, pubkey OCTET STRING
 * (a TPM2B_PUBLIC), privkey OCTET STRING (sealed to the TPM) }. Only pubkey is needed for the
 * kid and the algorithm, so a registry of TPM-held keys loads with the TPM absent or busy;
 * whether the TPM still has the key shows when it signs. */

#define TPM2_ALG_RSA 0x0001
#define TPM2_ALG_NULL 0x0010
#define TPM2_ALG_ECDAA 0x001A
#define TPM2_ALG_ECC 0x0023
#define TPM2_ECC_NIST_P256 0x0003
#define TPMA_SIGN_ENCRYPT 0x00040000u
#define TPMA_RESTRICTED 0x00010000u
#define OID_LOADABLE_KEY "2.23.133.10.1.3"

/* A bounds-checked reader over a TPM2 marshalled (big-endian) structure. */
struct rd {
	const unsigned char *p, *end;
	bool bad;
};

static uint32_t take(struct rd *r, size_t n)
{
	uint32_t v = 0;
	if(r->bad || (size_t)(r->end - r->p) < n){
		r->bad = true;
		return 0;
	}
	for(size_t i = 0; i < n; i++) v = v << 8 | r->p[i];
	r->p += n;
	return v;
}

/* A TPM2B: 16-bit size, then the bytes. Returns them (length in *len), or NULL if cut short. */
static const unsigned char *take_2b(struct rd *r, size_t *len)
{
	*len = take(r, 2);
	if(r->bad || (size_t)(r->end - r->p) < *len){
		r->bad = true;
		return NULL;
	}
	const unsigned char *b = r->p;
	r->p += *len;
	return b;
}

/* Skips a TPMT_SYM_DEF_OBJECT (key bits and mode unless the algorithm is NULL). */
static void skip_symmetric(struct rd *r)
{
	if(take(r, 2) != TPM2_ALG_NULL) take(r, 4);
}

/* The key as OpenSSL's default provider holds public keys. Returns it, or NULL. */
static EVP_PKEY *pkey_from_params(const char *type, OSSL_PARAM_BLD *bld)
{
	EVP_PKEY *pkey = NULL;
	OSSL_PARAM *params = OSSL_PARAM_BLD_to_param(bld);
	/* "?provider=default": a provider loaded beside it (a TPM's) would otherwise be free to
	 * take the public key and send every use of it to the device. */
	EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_name(NULL, type, "?provider=default");
	if(params == NULL || ctx == NULL || EVP_PKEY_fromdata_init(ctx) != 1
			|| EVP_PKEY_fromdata(ctx, &pkey, EVP_PKEY_PUBLIC_KEY, params) != 1){
		pkey = NULL;
	}
	EVP_PKEY_CTX_free(ctx);
	OSSL_PARAM_free(params);
	return pkey;
}

static EVP_PKEY *rsa_public(struct rd *r, char *err, size_t errlen)
{
	skip_symmetric(r);
	if(take(r, 2) != TPM2_ALG_NULL) take(r, 2);   /* scheme and its hash */
	take(r, 2);                                    /* key bits: the modulus says it */
	uint32_t e = take(r, 4);
	size_t nlen;
	const unsigned char *n = take_2b(r, &nlen);
	if(r->bad || nlen == 0){
		akz_set_err(err, errlen, "malformed TPM RSA public key");
		return NULL;
	}
	if(e == 0) e = 65537;    /* TPM2: 0 means the default exponent */
	OSSL_PARAM_BLD *bld = OSSL_PARAM_BLD_new();
	BIGNUM *bn = BN_bin2bn(n, (int)nlen, NULL), *be = BN_new();
	EVP_PKEY *pkey = NULL;
	if(bld && bn && be && BN_set_word(be, e)
			&& OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_N, bn)
			&& OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_E, be)){
		pkey = pkey_from_params("RSA", bld);
	}
	if(pkey == NULL) akz_set_err(err, errlen, "cannot rebuild the TPM RSA public key");
	BN_free(bn);
	BN_free(be);
	OSSL_PARAM_BLD_free(bld);
	return pkey;
}

static EVP_PKEY *ec_public(struct rd *r, char *err, size_t errlen)
{
	skip_symmetric(r);
	uint32_t scheme = take(r, 2);
	if(scheme != TPM2_ALG_NULL) take(r, scheme == TPM2_ALG_ECDAA ? 4 : 2);
	uint32_t curve = take(r, 2);
	if(take(r, 2) != TPM2_ALG_NULL) take(r, 2);   /* KDF and its hash */
	size_t xlen, ylen;
	const unsigned char *x = take_2b(r, &xlen), *y = take_2b(r, &ylen);
	if(r->bad){
		akz_set_err(err, errlen, "malformed TPM EC public key");
		return NULL;
	}
	if(curve != TPM2_ECC_NIST_P256){
		akz_set_err(err, errlen, "TPM EC key on curve 0x%04x: akenza accepts only P-256", (unsigned)curve);
		return NULL;
	}
	if(xlen > 32 || ylen > 32){
		akz_set_err(err, errlen, "malformed TPM EC public key");
		return NULL;
	}
	unsigned char point[65] = {0x04};
	memcpy(point + 1 + 32 - xlen, x, xlen);
	memcpy(point + 33 + 32 - ylen, y, ylen);
	OSSL_PARAM_BLD *bld = OSSL_PARAM_BLD_new();
	EVP_PKEY *pkey = NULL;
	if(bld && OSSL_PARAM_BLD_push_utf8_string(bld, OSSL_PKEY_PARAM_GROUP_NAME, "prime256v1", 0)
			&& OSSL_PARAM_BLD_push_octet_string(bld, OSSL_PKEY_PARAM_PUB_KEY, point, sizeof(point))){
		pkey = pkey_from_params("EC", bld);
	}
	if(pkey == NULL) akz_set_err(err, errlen, "cannot rebuild the TPM EC public key (not a point on P-256)");
	OSSL_PARAM_BLD_free(bld);
	return pkey;
}

/* Decodes a TPM2B_PUBLIC into a public key. Returns it, or NULL with a reason. */
static EVP_PKEY *tpm2b_public(const unsigned char *buf, size_t len, char *err, size_t errlen)
{
	struct rd r = {buf, buf + len, false};
	size_t inner;
	const unsigned char *pub = take_2b(&r, &inner);
	if(r.bad || r.p != r.end){
		akz_set_err(err, errlen, "malformed TPM public area");
		return NULL;
	}
	r = (struct rd){pub, pub + inner, false};
	uint32_t type = take(&r, 2);
	take(&r, 2);                                   /* name algorithm */
	uint32_t attrs = take(&r, 4);
	size_t plen;
	(void)take_2b(&r, &plen);                      /* auth policy */
	if(r.bad){
		akz_set_err(err, errlen, "malformed TPM public area");
		return NULL;
	}
	if(!(attrs & TPMA_SIGN_ENCRYPT) || (attrs & TPMA_RESTRICTED)){
		akz_set_err(err, errlen, "the TPM key cannot sign tokens (attributes 0x%08x: it needs sign, not restricted)",
				(unsigned)attrs);
		return NULL;
	}
	if(type == TPM2_ALG_RSA) return rsa_public(&r, err, errlen);
	if(type == TPM2_ALG_ECC) return ec_public(&r, err, errlen);
	akz_set_err(err, errlen, "TPM key of type 0x%04x: akenza accepts only RSA and EC P-256 keys", (unsigned)type);
	return NULL;
}

/* Steps over one DER element at *p (before end): its header into *tag, *cls, *len, *p past
 * the header. Returns false if malformed. */
static bool der_next(const unsigned char **p, const unsigned char *end, int *tag, int *cls, long *len)
{
	const unsigned char *q = *p;
	int rc = ASN1_get_object(&q, len, tag, cls, end - *p);
	if((rc & 0x80) || *len < 0 || end - q < *len) return false;
	*p = q;
	return true;
}

bool akz_tss2_is_pem(const char *buf)
{
	return strstr(buf, "-----BEGIN TSS2 PRIVATE KEY-----") != NULL;
}

EVP_PKEY *akz_tss2_public(const char *pem, size_t len, char *err, size_t errlen)
{
	BIO *bio = BIO_new_mem_buf(pem, (int)len);
	char *name = NULL, *header = NULL;
	unsigned char *der = NULL;
	long dlen = 0;
	EVP_PKEY *pkey = NULL;

	if(bio == NULL || PEM_read_bio(bio, &name, &header, &der, &dlen) != 1
			|| strcmp(name, "TSS2 PRIVATE KEY") != 0){
		akz_set_err(err, errlen, "not a TSS2 PRIVATE KEY PEM block");
		goto out;
	}
	const unsigned char *p = der, *end = der + dlen;
	int tag, cls;
	long l;
	if(!der_next(&p, end, &tag, &cls, &l) || tag != V_ASN1_SEQUENCE){
		akz_set_err(err, errlen, "malformed TSS2 key (no SEQUENCE)");
		goto out;
	}
	end = p + l;
	const unsigned char *oid = p;
	if(!der_next(&p, end, &tag, &cls, &l) || tag != V_ASN1_OBJECT){
		akz_set_err(err, errlen, "malformed TSS2 key (no type)");
		goto out;
	}
	ASN1_OBJECT *type = d2i_ASN1_OBJECT(NULL, &oid, p + l - oid);
	char oidtxt[64] = "";
	if(type) OBJ_obj2txt(oidtxt, sizeof(oidtxt), type, 1);
	ASN1_OBJECT_free(type);
	if(strcmp(oidtxt, OID_LOADABLE_KEY) != 0){
		akz_set_err(err, errlen, "TSS2 key of type %s: only loadable keys (" OID_LOADABLE_KEY ") sign tokens",
				oidtxt[0] ? oidtxt : "?");
		goto out;
	}
	p += l;
	/* Optional context-tagged fields, then parent INTEGER, then pubkey OCTET STRING. */
	for(;;){
		if(!der_next(&p, end, &tag, &cls, &l)){
			akz_set_err(err, errlen, "malformed TSS2 key");
			goto out;
		}
		if(cls == V_ASN1_CONTEXT_SPECIFIC){
			p += l;
			continue;
		}
		break;
	}
	if(tag != V_ASN1_INTEGER){
		akz_set_err(err, errlen, "malformed TSS2 key (no parent)");
		goto out;
	}
	p += l;
	if(!der_next(&p, end, &tag, &cls, &l) || tag != V_ASN1_OCTET_STRING){
		akz_set_err(err, errlen, "malformed TSS2 key (no public part)");
		goto out;
	}
	pkey = tpm2b_public(p, (size_t)l, err, errlen);
out:
	OPENSSL_free(name);
	OPENSSL_free(header);
	OPENSSL_free(der);
	BIO_free(bio);
	ERR_clear_error();
	return pkey;
}
