/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* handoff.c - the one queue from the bridge's threads to the broker thread. */
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "akz_handoff.h"

struct akz_handoff {
	pthread_mutex_t lock;        /* a leaf: nothing else is taken while it is held */
	struct akz_handoff_item *head, *tail;   /* under lock */
	size_t count[AKZ_HANDOFF_KINDS];        /* under lock */
	size_t dropped[AKZ_HANDOFF_KINDS];      /* under lock */
	size_t max[AKZ_HANDOFF_KINDS];          /* read-only */
	atomic_size_t items;         /* 0 only when there is nothing to take (items or drops): read
	                              * without the lock */
};

struct akz_handoff *akz_handoff_new(const size_t max[AKZ_HANDOFF_KINDS])
{
	struct akz_handoff *q = calloc(1, sizeof(*q));
	if(q == NULL) return NULL;
	if(pthread_mutex_init(&q->lock, NULL)){
		free(q);
		return NULL;
	}
	memcpy(q->max, max, sizeof(q->max));
	atomic_init(&q->items, 0);
	return q;
}

void akz_handoff_item_free(struct akz_handoff_item *it)
{
	if(it == NULL) return;
	if(it->kind == AKZ_HANDOFF_MESSAGE) free(it->u.msg);
	free(it);
}

void akz_handoff_free(struct akz_handoff *q)
{
	if(q == NULL) return;
	for(struct akz_handoff_item *it = q->head, *next; it; it = next){
		next = it->next;
		akz_handoff_item_free(it);
	}
	pthread_mutex_destroy(&q->lock);
	free(q);
}

/* Appends it (NULL: out of memory) unless its kind is at its maximum. Returns whether it was
 * queued; a refused item is freed and counted. */
static bool push(struct akz_handoff *q, enum akz_handoff_kind kind, struct akz_handoff_item *it)
{
	bool ok;
	pthread_mutex_lock(&q->lock);
	ok = it && q->count[kind] < q->max[kind];
	if(ok){
		it->next = NULL;
		if(q->tail) q->tail->next = it;
		else q->head = it;
		q->tail = it;
		q->count[kind]++;
	}else{
		q->dropped[kind]++;
	}
	atomic_fetch_add(&q->items, 1);   /* a drop is news for the taker too */
	pthread_mutex_unlock(&q->lock);
	if(!ok) akz_handoff_item_free(it);
	return ok;
}

/* An item of kind with room for len bytes of text (and its NUL). NULL when out of memory. */
static struct akz_handoff_item *new_item(enum akz_handoff_kind kind, size_t len)
{
	struct akz_handoff_item *it = malloc(sizeof(*it) + len + 1);
	if(it){
		it->kind = kind;
		it->level = 0;
		it->text[0] = '\0';
	}
	return it;
}

bool akz_handoff_message(struct akz_handoff *q, struct akz_msg *m)
{
	struct akz_handoff_item *it = m ? new_item(AKZ_HANDOFF_MESSAGE, 0) : NULL;
	if(it) it->u.msg = m;
	else free(m);
	return push(q, AKZ_HANDOFF_MESSAGE, it);
}

bool akz_handoff_status(struct akz_handoff *q, const char *id, const struct akz_status_dev *st,
		struct akz_spool_dev *sd)
{
	size_t len = strlen(id);
	struct akz_handoff_item *it = new_item(AKZ_HANDOFF_STATUS, len);
	if(it){
		it->u.status.st = *st;
		it->u.status.sd = sd;
		memcpy(it->text, id, len + 1);
	}
	return push(q, AKZ_HANDOFF_STATUS, it);
}

void akz_handoff_log(struct akz_handoff *q, int level, const char *fmt, ...)
{
	char text[512];
	va_list ap;

	va_start(ap, fmt);
	int n = vsnprintf(text, sizeof(text), fmt, ap);
	va_end(ap);
	size_t len = n < 0 ? 0 : strlen(text);
	struct akz_handoff_item *it = new_item(AKZ_HANDOFF_LOG, len);
	if(it){
		it->level = level;
		memcpy(it->text, text, len + 1);
	}
	(void)push(q, AKZ_HANDOFF_LOG, it);
}

struct akz_handoff_item *akz_handoff_take(struct akz_handoff *q, size_t max, bool *more,
		size_t dropped[AKZ_HANDOFF_KINDS])
{
	memset(dropped, 0, sizeof(size_t) * AKZ_HANDOFF_KINDS);
	*more = false;
	if(atomic_load(&q->items) == 0 || max == 0) return NULL;
	pthread_mutex_lock(&q->lock);
	struct akz_handoff_item *first = q->head, *last = NULL;
	size_t n = 0;
	for(struct akz_handoff_item *it = first; it && n < max; it = it->next, n++){
		q->count[it->kind]--;
		last = it;
	}
	if(last){
		q->head = last->next;
		if(q->head == NULL) q->tail = NULL;
		last->next = NULL;
	}
	memcpy(dropped, q->dropped, sizeof(q->dropped));
	memset(q->dropped, 0, sizeof(q->dropped));
	*more = q->head != NULL;
	atomic_store(&q->items, q->head ? 1 : 0);
	pthread_mutex_unlock(&q->lock);
	return last ? first : NULL;
}
