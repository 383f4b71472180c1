/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* window.c - one connection's uplinks waiting for akenza's PUBACK, and the spool's bookkeeping. */
#include <stdlib.h>
#include "akz_window.h"

_Static_assert((AKZ_WINDOW & (AKZ_WINDOW - 1)) == 0, "AKZ_WINDOW must be a power of two");

/* The slot where the uplink with this mid is put, if free, and looked for first: libmosquitto
 * numbers a connection's packets in sequence, so the window's mids rarely collide there. */
static int home_slot(int mid)
{
	return (int)((unsigned)mid & (AKZ_WINDOW - 1));
}

void akz_window_taken(struct akz_window *w, const struct akz_msg *m)
{
	if(m->seq) w->sent_upto = m->seq;
}

void akz_window_put(struct akz_window *w, int mid, struct akz_msg *m)
{
	int i = home_slot(mid);
	for(int n = 0; w->slot[i].m && n < AKZ_WINDOW; n++) i = (i + 1) & (AKZ_WINDOW - 1);
	w->slot[i].mid = mid;
	w->slot[i].m = m;
	w->count++;
}

struct akz_msg *akz_window_take(struct akz_window *w, int mid)
{
	for(int n = 0, i = home_slot(mid); n < AKZ_WINDOW; n++, i = (i + 1) & (AKZ_WINDOW - 1)){
		if(w->slot[i].m && w->slot[i].mid == mid){
			struct akz_msg *m = w->slot[i].m;
			w->slot[i].m = NULL;
			w->count--;
			return m;
		}
	}
	return NULL;
}

uint64_t akz_window_done_upto(const struct akz_window *w)
{
	uint64_t upto = w->sent_upto;
	if(w->count == 0) return upto;
	for(int i = 0; i < AKZ_WINDOW; i++){
		const struct akz_msg *m = w->slot[i].m;
		if(m && m->seq && m->seq <= upto) upto = m->seq - 1;
	}
	return upto;
}

void akz_window_settle(const struct akz_window *w, struct akz_spool *s, struct akz_spool_dev *sd,
		const struct akz_msg *m)
{
	if(s && sd && m->spooled) akz_spool_settle(s, sd, m->spooled, 1, akz_window_done_upto(w));
}

static int cmp_seq(const void *a, const void *b)
{
	uint64_t x = (*(struct akz_msg *const *)a)->seq, y = (*(struct akz_msg *const *)b)->seq;
	return x < y ? -1 : x > y;
}

/* Appends m to out if the spool has it, else frees it. */
static void keep_spooled(struct akz_msgq *out, struct akz_msg *m)
{
	if(m->seq) akz_msgq_push(out, m);
	else free(m);
}

void akz_window_give_back(struct akz_window *w, struct akz_msgq *pending, struct akz_msgq *out)
{
	struct akz_msg *win[AKZ_WINDOW] = {0};
	size_t n = 0;

	for(int i = 0; i < AKZ_WINDOW; i++){
		if(w->slot[i].m) win[n++] = w->slot[i].m;
		w->slot[i].m = NULL;
	}
	w->count = 0;
	qsort(win, n, sizeof(struct akz_msg *), cmp_seq);
	for(size_t i = 0; i < n; i++) keep_spooled(out, win[i]);
	for(struct akz_msg *m; (m = akz_msgq_pop(pending)) != NULL;) keep_spooled(out, m);
}
