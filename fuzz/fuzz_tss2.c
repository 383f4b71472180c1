/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* fuzz_tss2.c - libFuzzer target: the public half of a TPM key blob (akz_tss2_public), read from
 * files an attacker with write access to the key store could shape. Input: the blob's DER, which
 * the target wraps into a "TSS2 PRIVATE KEY" PEM block. A key returned must be one akenza takes
 * (RSA, or EC on P-256) and public only; otherwise a reason must be given. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include "akz_tss2.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if(size > 4096) return 0;
	static const char head[] = "-----BEGIN TSS2 PRIVATE KEY-----\n", tail[] = "-----END TSS2 PRIVATE KEY-----\n";
	size_t b64 = 4 * ((size + 2) / 3);
	char *pem = malloc(sizeof(head) + b64 + b64 / 64 + 2 + sizeof(tail));
	if(pem == NULL) return 0;
	memcpy(pem, head, sizeof(head));
	size_t n = sizeof(head) - 1;
	/* 48 input bytes per 64-character line, as PEM writers do */
	for(size_t off = 0; off < size; off += 48){
		size_t chunk = size - off < 48 ? size - off : 48;
		n += (size_t)EVP_EncodeBlock((unsigned char *)pem + n, data + off, (int)chunk);
		pem[n++] = '\n';
	}
	memcpy(pem + n, tail, sizeof(tail));
	n += strlen(tail);

	char err[256] = "";
	EVP_PKEY *pkey = akz_tss2_public(pem, n, err, sizeof(err));
	if(pkey == NULL){
		if(err[0] == '\0') abort();
	}else{
		if(EVP_PKEY_is_a(pkey, "EC")){
			char group[64] = "";
			size_t glen = 0;
			if(EVP_PKEY_get_utf8_string_param(pkey, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof(group), &glen) != 1
					|| strcmp(group, "prime256v1") != 0){
				abort();
			}
		}else if(!EVP_PKEY_is_a(pkey, "RSA")){
			abort();
		}
		BIGNUM *priv = NULL;
		if(EVP_PKEY_get_bn_param(pkey, OSSL_PKEY_PARAM_PRIV_KEY, &priv) == 1
				|| EVP_PKEY_get_bn_param(pkey, OSSL_PKEY_PARAM_RSA_D, &priv) == 1){
			abort();
		}
		EVP_PKEY_free(pkey);
	}
	free(pem);
	return 0;
}
