/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* fuzz_config.c - libFuzzer target: plugin_opt_* values through akz_config_parse.
 * Input: lines "<key> <value>" (or "<key>=<value>"); a line without a separator is an option
 * without a value (NULL), as the broker could hand over. At most 64 options per input. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "akz_mosquitto.h"
#include "akz_config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MAX_OPTS 64

static void count_report(void *ctx, const char *msg)
{
	int *n = ctx;
	if(msg == NULL || msg[0] == '\0') abort();   /* every report names the option and the reason */
	(*n)++;
}

/* Notices (options that no longer do anything) are not problems: checked for a text only. */
static void count_notice(void *ctx, const char *msg)
{
	(void)ctx;
	if(msg == NULL || strstr(msg, "no longer used") == NULL) abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char *buf = malloc(size + 1);
	if(buf == NULL) return 0;
	memcpy(buf, data, size);
	buf[size] = '\0';
	struct mosquitto_opt opts[MAX_OPTS];
	int count = 0;
	for(char *line = buf, *next; line && count < MAX_OPTS; line = next){
		next = strchr(line, '\n');
		if(next) *next++ = '\0';
		char *sep = strpbrk(line, " =");
		if(sep) *sep = '\0';
		opts[count].key = line;
		opts[count].value = sep ? sep + 1 : NULL;
		count++;
	}
	struct akz_config cfg;
	int reports = 0;
	int rc = akz_config_parse(&cfg, opts, count, count_report, count_notice, &reports);
	if(rc == 0){
		/* Success: the required option is there, reported nothing, and the defaults are filled. */
		if(reports != 0 || cfg.devices_path == NULL || cfg.upstream_host == NULL) abort();
		if(cfg.upstream_port < 1 || cfg.upstream_port > 65535) abort();
		akz_config_free(&cfg);
	}else if(rc != -1 || reports == 0){
		abort();
	}
	free(buf);
	return 0;
}
