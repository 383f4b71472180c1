/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akz_topic.h - akenza topic names: /up/device/id/<id>[/...] and /down/device/id/<id>/... */
#ifndef AKZ_TOPIC_H
#define AKZ_TOPIC_H

#include <stddef.h>

enum akz_topic_dir { AKZ_TOPIC_UP, AKZ_TOPIC_DOWN };

#define AKZ_UP_PREFIX "/up/device/id/"
#define AKZ_DOWN_PREFIX "/down/device/id/"

/* If `topic` is <prefix of dir><id> or <prefix of dir><id>/<anything>, returns a pointer to the
 * id inside topic and sets *idlen; otherwise returns NULL. The id is never empty and never
 * contains '/', '+' or '#'. Never fails otherwise; does not allocate. */
const char *akz_topic_device(const char *topic, enum akz_topic_dir dir, size_t *idlen);

/* True if topic names device `id` in direction dir (exactly or below it). */
int akz_topic_is_for(const char *topic, enum akz_topic_dir dir, const char *id);

#endif
