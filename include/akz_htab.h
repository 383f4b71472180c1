/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akz_htab.h - a hash table of string keys whose nodes are embedded in the caller's objects
 * (akz_container_of finds the object): devices in the bridge and in the spool. Not thread-safe:
 * the owner's lock guards it. */
#ifndef AKZ_HTAB_H
#define AKZ_HTAB_H

#include <stddef.h>

struct akz_htab_node {
	struct akz_htab_node *next;  /* the bucket's chain */
	const char *key;             /* not copied: lives as long as the node is in the table */
	size_t keylen;
	size_t hash;
};

struct akz_htab {
	struct akz_htab_node **buckets;
	size_t nbuckets;             /* 0 or a power of two */
	size_t count;
};

/* An empty table; allocates nothing. */
#define AKZ_HTAB_INIT {NULL, 0, 0}

/* Frees the table's own memory (not the nodes) and empties it. */
void akz_htab_free(struct akz_htab *t);

/* Makes room for want nodes in all, so that inserting up to that many cannot fail. Returns 0,
 * or -1 when out of memory (the table is unchanged). */
int akz_htab_reserve(struct akz_htab *t, size_t want);

/* The node whose key is key[0..len), or NULL. */
struct akz_htab_node *akz_htab_find(const struct akz_htab *t, const char *key, size_t len);

/* Adds n under key (len bytes, kept by reference) after making room. Returns 0, or -1 when out
 * of memory (n is not added). The caller keeps keys unique. */
int akz_htab_insert(struct akz_htab *t, struct akz_htab_node *n, const char *key, size_t len);

/* Takes n, which is in t, out of it. Never fails. */
void akz_htab_remove(struct akz_htab *t, struct akz_htab_node *n);

/* The first node in an arbitrary order, or NULL; with akz_htab_next, a walk that survives the
 * removal of the node it stands on if the next one is taken first. */
struct akz_htab_node *akz_htab_first(const struct akz_htab *t);
struct akz_htab_node *akz_htab_next(const struct akz_htab *t, const struct akz_htab_node *n);

#endif
