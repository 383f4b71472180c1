/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* htab.c - a hash table of string keys with nodes embedded in the caller's objects. */
#include <stdlib.h>
#include <string.h>
#include "akz_htab.h"

#define FIRST_BUCKETS 64

/* FNV-1a. */
static size_t hash_key(const char *key, size_t len)
{
	size_t h = (size_t)1469598103934665603ULL;
	for(size_t i = 0; i < len; i++){
		h ^= (unsigned char)key[i];
		h *= (size_t)1099511628211ULL;
	}
	return h;
}

void akz_htab_free(struct akz_htab *t)
{
	free(t->buckets);
	t->buckets = NULL;
	t->nbuckets = t->count = 0;
}

int akz_htab_reserve(struct akz_htab *t, size_t want)
{
	if(t->nbuckets && want <= t->nbuckets / 2) return 0;   /* chains stay short at half load */
	size_t n = t->nbuckets ? t->nbuckets : FIRST_BUCKETS;
	while(n / 2 < want) n *= 2;
	struct akz_htab_node **nb = calloc(n, sizeof(struct akz_htab_node *));
	if(nb == NULL) return -1;
	for(size_t i = 0; i < t->nbuckets; i++){
		for(struct akz_htab_node *e = t->buckets[i], *next; e; e = next){
			next = e->next;
			e->next = nb[e->hash & (n - 1)];
			nb[e->hash & (n - 1)] = e;
		}
	}
	free(t->buckets);
	t->buckets = nb;
	t->nbuckets = n;
	return 0;
}

struct akz_htab_node *akz_htab_find(const struct akz_htab *t, const char *key, size_t len)
{
	if(t->nbuckets == 0) return NULL;
	size_t h = hash_key(key, len);
	for(struct akz_htab_node *e = t->buckets[h & (t->nbuckets - 1)]; e; e = e->next){
		if(e->hash == h && e->keylen == len && memcmp(e->key, key, len) == 0) return e;
	}
	return NULL;
}

int akz_htab_insert(struct akz_htab *t, struct akz_htab_node *n, const char *key, size_t len)
{
	if(akz_htab_reserve(t, t->count + 1)) return -1;
	n->key = key;
	n->keylen = len;
	n->hash = hash_key(key, len);
	struct akz_htab_node **b = &t->buckets[n->hash & (t->nbuckets - 1)];
	n->next = *b;
	*b = n;
	t->count++;
	return 0;
}

void akz_htab_remove(struct akz_htab *t, struct akz_htab_node *n)
{
	struct akz_htab_node **pp = &t->buckets[n->hash & (t->nbuckets - 1)];
	while(*pp && *pp != n) pp = &(*pp)->next;
	if(*pp == NULL) return;
	*pp = n->next;
	n->next = NULL;
	t->count--;
}

/* The first node in bucket i or after it, or NULL. */
static struct akz_htab_node *from_bucket(const struct akz_htab *t, size_t i)
{
	for(; i < t->nbuckets; i++){
		if(t->buckets[i]) return t->buckets[i];
	}
	return NULL;
}

struct akz_htab_node *akz_htab_first(const struct akz_htab *t)
{
	return from_bucket(t, 0);
}

struct akz_htab_node *akz_htab_next(const struct akz_htab *t, const struct akz_htab_node *n)
{
	return n->next ? n->next : from_bucket(t, (n->hash & (t->nbuckets - 1)) + 1);
}
