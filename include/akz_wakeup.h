/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akz_wakeup.h - waking the broker thread out of its event-loop sleep, so that its TICK runs now. */
#ifndef AKZ_WAKEUP_H
#define AKZ_WAKEUP_H

#include <stddef.h>

struct akz_wakeup;

/* Makes every wakeup made from now on also wake the broker thread when no TICK has run for ms
 * (0: never, the default), for a broker whose loop may sleep longer than that between events
 * (Mosquitto 2.1 built without websockets). Process-wide, as the broker is: call at plugin init,
 * before akz_wakeup_new. Never fails. */
void akz_wakeup_set_heartbeat(int ms);

/* Sets up waking the calling thread, which must be the broker's (the plugin's init runs on it).
 * Installs a do-nothing handler for one real-time signal, shared by all instances, and the
 * heartbeat's timer if one is set. Returns 0, or -1 with the reason in err (the signal already
 * has another handler, no timer: the caller then lets the TICK come in its own time). */
int akz_wakeup_new(struct akz_wakeup **out, char *err, size_t errlen);

/* Wakes the broker thread unless a wake is already on its way. Any thread; never fails. NULL is
 * ignored. */
void akz_wakeup_poke(struct akz_wakeup *w);

/* Sends an outstanding poke again if the TICK has not acknowledged it within a few ms: the
 * signal may have landed just before the broker went to sleep, and been spent. Returns the ms
 * until it should be called again, or -1 when no poke is outstanding (NULL too). The thread that
 * pokes calls it from its own loop; never fails. */
int akz_wakeup_recheck(struct akz_wakeup *w);

/* Tells that the broker thread is awake (call at the start of every TICK): the next poke signals
 * again, and the heartbeat, if on, is pushed back. Broker thread; NULL is ignored. */
void akz_wakeup_ack(struct akz_wakeup *w);

/* Frees w once no thread pokes any more. With the last instance the signal is set to be ignored
 * (not to its default, which would end the process if a poke were still in flight). */
void akz_wakeup_free(struct akz_wakeup *w);

#endif
