/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* fuzz_text.c - libFuzzer target: the text checks every module shares (akz_text_bad_reason,
 * akz_utf8_seq_len, akz_escape, akz_json_has_nul) and the key-reference rule (akz_keyref_parse).
 * Checks their contracts on every input, so a wrong answer is a finding too: an escaped log line
 * that still holds a control character, or a key reference whose path lies outside it. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "akz_keystore.h"
#include "akz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* The escape of s must be one line of valid UTF-8 without control characters, and when s is
 * clean (and fits) it must be s itself. */
static void check_escape(const char *s, size_t outlen)
{
	char *out = malloc(outlen);
	if(out == NULL) return;
	size_t n = akz_escape(out, outlen, s);
	if(n >= outlen || strlen(out) != n) abort();
	if(akz_text_bad_reason(out) != NULL) abort();
	if(akz_text_bad_reason(s) == NULL && strchr(s, '\\') == NULL && strlen(s) + 4 <= outlen
			&& strcmp(out, s) != 0){
		abort();
	}
	free(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char *s = malloc(size + 1);
	if(s == NULL) return 0;
	memcpy(s, data, size);
	s[size] = '\0';
	if(memchr(data, '\0', size) && !akz_json_has_nul((const char *)data, size)) abort();

	/* akz_text_bad_reason agrees with a walk of akz_utf8_seq_len. */
	bool clean = true;
	for(const unsigned char *p = (const unsigned char *)s; *p;){
		size_t k = akz_utf8_seq_len(p);
		if(k == 0 || *p < 0x20 || *p == 0x7F || (k == 2 && p[0] == 0xC2 && p[1] < 0xA0)){
			clean = false;
			break;
		}
		for(size_t j = 1; j < k; j++) if(p[j] == 0) abort();   /* never across the terminator */
		p += k;
	}
	if(clean != (akz_text_bad_reason(s) == NULL)) abort();

	check_escape(s, 1);
	check_escape(s, 16);
	check_escape(s, 4096);
	const char *e = akz_esc(s);
	if(akz_text_bad_reason(e) != NULL) abort();

	const char *path = NULL;
	switch(akz_keyref_parse(s, &path)){
	case AKZ_KEYREF_PATH:
		if(path == NULL || path < s || path > s + strlen(s) || *path == '\0') abort();
		break;
	case AKZ_KEYREF_STORE:
	case AKZ_KEYREF_BAD:
		if(path != NULL) abort();
		break;
	}
	free(s);
	return 0;
}
