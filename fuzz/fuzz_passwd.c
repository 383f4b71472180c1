/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* fuzz_passwd.c - libFuzzer target: the password-hash parser and verifier (passwd.c).
 * Input: <hash text>[\n<password>]. Every parsed hash is verified against the password, so the
 * parser's iteration bound is what keeps a run fast: a hash the parser accepts is one the broker
 * thread may have to compute at every login. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "akz_passwd.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Iterations above this are parsed but not verified here: the real bound (passwd.c) still allows
 * ~0.5 s hashes, too slow for a fuzzer's hundreds of runs per second. */
#define FUZZ_VERIFY_ITERATIONS_MAX 2000

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char *buf = malloc(size + 1);
	if(buf == NULL) return 0;
	memcpy(buf, data, size);
	buf[size] = '\0';
	char *nl = strchr(buf, '\n');
	const char *password = "";
	if(nl){
		*nl = '\0';
		password = nl + 1;
	}
	struct akz_pw pw;
	char err[256];
	err[0] = '\0';
	if(akz_pw_parse(buf, &pw, err, sizeof(err)) == 0){
		if(pw.kind != AKZ_PW_SHA512 && pw.kind != AKZ_PW_PBKDF2) abort();
		if(pw.iterations < 1 || pw.iterations > 1000000) abort();   /* passwd.c's bound */
		if(pw.iterations <= FUZZ_VERIFY_ITERATIONS_MAX) (void)akz_pw_verify(&pw, password);
	}else if(err[0] == '\0'){
		abort();   /* every refusal says why */
	}
	free(buf);
	return 0;
}
