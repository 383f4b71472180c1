/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* fuzz_topic.c - libFuzzer target: akenza topic parsing (akz_topic_device, akz_topic_is_for).
 * Input: <topic>[\0<id>]. Checks the contract of akz_topic.h on every input, so a wrong answer
 * (not only a crash) is a finding: the ACL and the bridge route on these results. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "akz_topic.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Checks what akz_topic_device returned for topic in direction dir; aborts on a broken contract. */
static void check_dir(const char *topic, enum akz_topic_dir dir, const char *id)
{
	const char *prefix = dir == AKZ_TOPIC_UP ? AKZ_UP_PREFIX : AKZ_DOWN_PREFIX;
	size_t n = 0;
	const char *tid = akz_topic_device(topic, dir, &n);
	if(tid){
		size_t plen = strlen(prefix);
		/* The id lies inside the topic right after the prefix, is non-empty, has no separators
		 * or wildcards, and ends the topic or a level. */
		if(tid != topic + plen || n == 0 || n > strlen(tid)) abort();
		if(memchr(tid, '/', n) || memchr(tid, '+', n) || memchr(tid, '#', n)) abort();
		if(tid[n] != '\0' && tid[n] != '/') abort();
		if(strncmp(topic, prefix, plen) != 0) abort();
		/* The id it found is the one the topic is for. */
		char *copy = strndup(tid, n);
		if(copy == NULL) return;
		if(!akz_topic_is_for(topic, dir, copy)) abort();
		free(copy);
	}
	int is_for = akz_topic_is_for(topic, dir, id);
	if(is_for && (tid == NULL || strlen(id) != n || memcmp(tid, id, n) != 0)) abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	/* Two C strings from one input: the topic, then (after a NUL) an id to compare with. */
	char *buf = malloc(size + 2);
	if(buf == NULL) return 0;
	memcpy(buf, data, size);
	buf[size] = '\0';
	buf[size + 1] = '\0';
	const char *topic = buf;
	const char *id = buf + strlen(buf) + 1;
	check_dir(topic, AKZ_TOPIC_UP, id);
	check_dir(topic, AKZ_TOPIC_DOWN, id);
	free(buf);
	return 0;
}
