/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* fuzz_registry.c - libFuzzer target: the device registry parser (akz_registry_load).
 * The input is written as devices.json into a private temporary directory whose key store holds
 * one valid EC key (dev1.pem), so that a device "dev1" resolves and loads its key and others fail
 * on a missing key, both paths the parser must survive. Every problem goes to a collecting report
 * function; a successful load is queried through every lookup. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "akz_keystore.h"
#include "akz_registry.h"
#include "fuzz_common.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char dir[64];
static char keys[128];
static char regpath[128];

static void cleanup(void)
{
	fuzz_clear_dir(keys, 1);
	fuzz_clear_dir(dir, 1);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	snprintf(dir, sizeof(dir), "/tmp/akz-fuzz-registry-XXXXXX");
	if(mkdtemp(dir) == NULL) abort();
	snprintf(keys, sizeof(keys), "%s/keys", dir);
	snprintf(regpath, sizeof(regpath), "%s/devices.json", dir);
	if(mkdir(keys, 0700) != 0) abort();
	char priv[192], err[256];
	snprintf(priv, sizeof(priv), "%s/dev1.pem", keys);
	struct akz_key *key = NULL;
	if(akz_key_generate(AKZ_ALG_ES256, 0, &key, err, sizeof(err)) != 0
			|| akz_key_write(key, priv, NULL, err, sizeof(err)) != 0){
		abort();
	}
	akz_key_unref(key);
	atexit(cleanup);
	return 0;
}

/* Collects problems: checks each is one non-empty line naming the file. */
static void collect(void *ctx, const char *problem)
{
	size_t *n = ctx;
	if(problem == NULL || strncmp(problem, regpath, strlen(regpath)) != 0) abort();
	(*n)++;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if(fuzz_write_file(regpath, data, size) != 0) return 0;
	struct akz_key_opts kopts = {0};
	struct akz_registry *reg = NULL;
	size_t problems = 0;
	int rc = akz_registry_load(regpath, keys, &kopts, collect, &problems, &reg);
	if(rc != 0){
		if(reg != NULL || problems == 0) abort();   /* a refusal always says why */
		return 0;
	}
	if(reg == NULL || problems != 0) abort();
	for(size_t i = 0; i < akz_registry_device_count(reg); i++){
		const struct akz_device *d = akz_registry_device_at(reg, i);
		if(d == NULL || d->id == NULL || d->username == NULL || d->password == NULL || d->key == NULL) abort();
		if(akz_registry_find_device(reg, d->id) != d) abort();
		if(akz_registry_find_device_by_username(reg, d->username) != d) abort();
	}
	for(size_t i = 0; i < akz_registry_gateway_count(reg); i++){
		const struct akz_gateway *g = akz_registry_gateway_at(reg, i);
		if(g == NULL || akz_registry_find_gateway(reg, g->username) != g) abort();
		for(size_t k = 0; k < g->ndevices; k++){
			if(!akz_gateway_serves(g, g->devices[k])) abort();
		}
		(void)akz_gateway_serves(g, "dev1");
	}
	(void)akz_registry_find_device(reg, "dev1");
	(void)akz_registry_find_device(reg, "");
	akz_registry_free(reg);
	return 0;
}
