/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* topic.c - recognising akenza device topics. */
#include <string.h>
#include "akz_topic.h"

const char *akz_topic_device(const char *topic, enum akz_topic_dir dir, size_t *idlen)
{
	const char *prefix = dir == AKZ_TOPIC_UP ? AKZ_UP_PREFIX : AKZ_DOWN_PREFIX;
	size_t plen = strlen(prefix);

	if(topic == NULL || strncmp(topic, prefix, plen) != 0) return NULL;
	const char *id = topic + plen;
	size_t n = strcspn(id, "/");
	if(n == 0) return NULL;
	/* Wildcards are never part of a device id: "/up/device/id/+" names no one device. */
	if(memchr(id, '+', n) || memchr(id, '#', n)) return NULL;
	*idlen = n;
	return id;
}

int akz_topic_is_for(const char *topic, enum akz_topic_dir dir, const char *id)
{
	size_t n;
	const char *tid = akz_topic_device(topic, dir, &n);
	return tid != NULL && strlen(id) == n && memcmp(tid, id, n) == 0;
}
