/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akz_queue.h - FIFO queues of messages: a device's pending uplinks, a spool backlog. */
#ifndef AKZ_QUEUE_H
#define AKZ_QUEUE_H

#include <stddef.h>
#include <stdint.h>

/* One message; topic, payload and correlation data live in the same allocation. */
struct akz_msg {
	struct akz_msg *next;
	char *topic;
	void *payload;
	void *corr;           /* MQTT v5 correlation data of an uplink, NULL if none */
	uint64_t seq;         /* per-device spool sequence number, 0 when not spooled */
	int64_t time;         /* wall-clock second the edge accepted it (for the TTL) */
	uint32_t payloadlen;
	uint32_t spooled;     /* bytes it takes in the spool, 0 when not spooled */
	uint16_t corrlen;
	uint8_t qos;
};

struct akz_msgq {
	struct akz_msg *head, *tail;
	size_t count;
	size_t bytes;  /* payload bytes */
};

/* Copies topic (topiclen bytes, need not be NUL-terminated), payload and corr (may be NULL)
 * into one new message stamped with the current time. Returns NULL when out of memory.
 * Free with free(). */
struct akz_msg *akz_msg_new(const char *topic, size_t topiclen, const void *payload,
		uint32_t payloadlen, uint8_t qos, const void *corr, uint16_t corrlen);

void akz_msgq_push(struct akz_msgq *q, struct akz_msg *m);

/* The oldest message without removing it, NULL when empty. */
static inline struct akz_msg *akz_msgq_peek(const struct akz_msgq *q) { return q->head; }

/* Removes and returns the oldest message, NULL when empty. */
struct akz_msg *akz_msgq_pop(struct akz_msgq *q);

/* Moves every message of src to the end of dst; src becomes empty. */
void akz_msgq_take_all(struct akz_msgq *dst, struct akz_msgq *src);

/* Moves the n oldest messages of src (all, if it holds fewer) to the end of dst. */
void akz_msgq_take_head(struct akz_msgq *dst, struct akz_msgq *src, size_t n);

/* Frees every message; returns how many there were. */
size_t akz_msgq_clear(struct akz_msgq *q);

#endif
