/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* queue.c - FIFO queues of messages: a device's pending uplinks, a spool backlog. */
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "akz_queue.h"

struct akz_msg *akz_msg_new(const char *topic, size_t topiclen, const void *payload,
		uint32_t payloadlen, uint8_t qos, const void *corr, uint16_t corrlen)
{
	if(corr == NULL) corrlen = 0;
	/* One allocation per message: the hot path pays one malloc and one free. */
	struct akz_msg *m = malloc(sizeof(*m) + topiclen + 1 + (size_t)payloadlen + corrlen);
	if(m == NULL) return NULL;
	memset(m, 0, sizeof(*m));
	m->topic = (char *)(m + 1);
	memcpy(m->topic, topic, topiclen);
	m->topic[topiclen] = '\0';
	m->payload = m->topic + topiclen + 1;
	if(payloadlen) memcpy(m->payload, payload, payloadlen);
	m->payloadlen = payloadlen;
	if(corrlen){
		m->corr = (char *)m->payload + payloadlen;
		memcpy(m->corr, corr, corrlen);
		m->corrlen = corrlen;
	}
	m->qos = qos;
	m->time = (int64_t)time(NULL);
	return m;
}

void akz_msgq_push(struct akz_msgq *q, struct akz_msg *m)
{
	m->next = NULL;
	if(q->tail) q->tail->next = m;
	else q->head = m;
	q->tail = m;
	q->count++;
	q->bytes += m->payloadlen;
}

struct akz_msg *akz_msgq_pop(struct akz_msgq *q)
{
	struct akz_msg *m = q->head;
	if(m == NULL) return NULL;
	q->head = m->next;
	if(q->head == NULL) q->tail = NULL;
	q->count--;
	q->bytes -= m->payloadlen;
	m->next = NULL;
	return m;
}

void akz_msgq_take_all(struct akz_msgq *dst, struct akz_msgq *src)
{
	if(src->head == NULL) return;
	if(dst->tail) dst->tail->next = src->head;
	else dst->head = src->head;
	dst->tail = src->tail;
	dst->count += src->count;
	dst->bytes += src->bytes;
	memset(src, 0, sizeof(*src));
}

void akz_msgq_take_head(struct akz_msgq *dst, struct akz_msgq *src, size_t n)
{
	for(struct akz_msg *m; n > 0 && (m = akz_msgq_pop(src)) != NULL; n--) akz_msgq_push(dst, m);
}

size_t akz_msgq_clear(struct akz_msgq *q)
{
	size_t n = q->count;
	struct akz_msg *m = q->head;
	while(m){
		struct akz_msg *next = m->next;
		free(m);
		m = next;
	}
	memset(q, 0, sizeof(*q));
	return n;
}
