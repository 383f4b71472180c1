/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* fds.c - the file descriptors the bridge needs: libmosquitto's unused socket pairs, and the
 * process's open-file limit. */
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>
#include <mosquitto.h>
#include "akz_fds.h"

/* Why this file pokes into a libmosquitto client: libmosquitto opens a socket pair for every
 * client, so that another thread can interrupt the select() in mosquitto_loop(). The bridge
 * drives its clients from its own epoll loop and never calls mosquitto_loop(), so the pair only
 * costs two descriptors per device (three in all: a broker under the usual 1,024-descriptor
 * limit carried ~330 devices instead of ~1,000) and a write(2) on every publish.
 *
 * libmosquitto 2.1 has an option for this, MOSQ_OPT_DISABLE_SOCKETPAIR, and the plugin sets it
 * where the library has it; but 2.1.2 reads the flag only in mosquitto_reinitialise(), right
 * after clearing the whole struct (flag included), and setting it on a client made by
 * mosquitto_new() closes nothing. So the probe below first asks whether the option frees the
 * pair (the lowest free descriptor number is the same before mosquitto_new() and after the
 * option: socketpair() takes the lowest free numbers); only where it does not is the pair closed
 * by hand. The pair sits right after the client's socket at the start of struct mosquitto, as
 * `sock, sockpairR, sockpairW` (mosquitto_internal.h, client build, unchanged from 1.4 to 2.0.20
 * and in 2.1.2). akz_fds_probe_pair() proves that layout once with a throwaway client; after
 * that akz_fds_close_pair() closes a fresh client's pair and stores INVALID_SOCKET in its place,
 * the state libmosquitto itself runs in when socketpair() fails (it then skips the wake-up write
 * and closes nothing at destroy). If the proof fails, nothing is ever touched. */
enum { SLOT_SOCK, SLOT_PAIR_R, SLOT_PAIR_W, SLOTS };
enum pair_mode { PAIR_KEPT, PAIR_BY_OPTION, PAIR_BY_HAND };

#define OPT_DISABLE_SOCKETPAIR 14   /* MOSQ_OPT_DISABLE_SOCKETPAIR, libmosquitto 2.1 */

static _Atomic int pair_mode = PAIR_KEPT;

/* True if this libmosquitto (the one loaded, not the headers') has the option. */
static bool lib_has_option(void)
{
	int major = 0, minor = 0, revision = 0;
	mosquitto_lib_version(&major, &minor, &revision);
	return major > 2 || (major == 2 && minor >= 1);
}

/* Sets the option on mosq. True if the library took it (which alone frees nothing in 2.1.2). */
static bool set_option(struct mosquitto *mosq)
{
	return lib_has_option() && mosquitto_int_option(mosq, OPT_DISABLE_SOCKETPAIR, 1) == MOSQ_ERR_SUCCESS;
}

/* The number open() would give a new descriptor now, or -1. */
static int lowest_free_fd(void)
{
	int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
	if(fd >= 0) close(fd);
	return fd;
}

static void read_slots(const struct mosquitto *mosq, int slots[SLOTS])
{
	memcpy(slots, mosq, sizeof(int) * SLOTS);
}

/* True if fd is an open, non-blocking Unix stream socket: what libmosquitto's pair ends are. */
static bool is_pair_end(int fd)
{
	int domain = 0, type = 0;
	socklen_t len = sizeof(domain);
	if(fd < 0) return false;
	int flags = fcntl(fd, F_GETFL);
	if(flags < 0 || !(flags & O_NONBLOCK)) return false;
	if(getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) || domain != AF_UNIX) return false;
	len = sizeof(type);
	return getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) == 0 && type == SOCK_STREAM;
}

/* A client fresh from mosquitto_new(): no connection yet, and two distinct pair ends. */
static bool looks_fresh(const int slots[SLOTS])
{
	return slots[SLOT_SOCK] == -1 && slots[SLOT_PAIR_R] != slots[SLOT_PAIR_W]
			&& is_pair_end(slots[SLOT_PAIR_R]) && is_pair_end(slots[SLOT_PAIR_W]);
}

static bool is_closed(int fd)
{
	return fcntl(fd, F_GETFD) == -1 && errno == EBADF;
}

/* Whether the option alone leaves a fresh client without a pair: checked with a throwaway one. */
static bool option_frees_pair(void)
{
	int before = lowest_free_fd();
	struct mosquitto *probe = mosquitto_new(NULL, true, NULL);
	if(probe == NULL) return false;
	bool freed = set_option(probe) && before >= 0 && lowest_free_fd() == before;
	mosquitto_destroy(probe);
	return freed;
}

/* The proof that the first slots hold the pair: they held Unix sockets, and destroying the
 * client closed exactly those descriptors. */
static bool layout_proven(void)
{
	struct mosquitto *probe = mosquitto_new(NULL, true, NULL);
	if(probe == NULL) return false;
	int slots[SLOTS];
	read_slots(probe, slots);
	bool fresh = looks_fresh(slots);
	mosquitto_destroy(probe);
	return fresh && is_closed(slots[SLOT_PAIR_R]) && is_closed(slots[SLOT_PAIR_W]);
}

bool akz_fds_probe_pair(void)
{
	if(atomic_load(&pair_mode) != PAIR_KEPT) return true;
	if(option_frees_pair()) atomic_store(&pair_mode, PAIR_BY_OPTION);
	else if(layout_proven()) atomic_store(&pair_mode, PAIR_BY_HAND);
	return atomic_load(&pair_mode) != PAIR_KEPT;
}

bool akz_fds_close_pair(struct mosquitto *mosq)
{
	int mode = atomic_load(&pair_mode);
	if(mosq == NULL || mode == PAIR_KEPT) return false;
	if(mode == PAIR_BY_OPTION) return set_option(mosq);
	int slots[SLOTS];
	read_slots(mosq, slots);
	if(!looks_fresh(slots)) return false;
	const int invalid[2] = {-1, -1};
	memcpy((unsigned char *)mosq + sizeof(int) * SLOT_PAIR_R, invalid, sizeof(invalid));
	close(slots[SLOT_PAIR_R]);
	close(slots[SLOT_PAIR_W]);
	return true;
}

int akz_fds_per_device(void)
{
	return atomic_load(&pair_mode) != PAIR_KEPT ? 1 : 3;
}

int akz_fds_reserve(size_t need, size_t *soft_before, size_t *soft_after)
{
	struct rlimit rl;
	if(getrlimit(RLIMIT_NOFILE, &rl)){
		*soft_before = *soft_after = 0;
		return -1;
	}
	*soft_before = *soft_after = rl.rlim_cur == RLIM_INFINITY ? SIZE_MAX : (size_t)rl.rlim_cur;
	if(rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur >= (rlim_t)need) return 0;
	bool enough = rl.rlim_max == RLIM_INFINITY || rl.rlim_max >= (rlim_t)need;
	rl.rlim_cur = enough ? (rlim_t)need : rl.rlim_max;
	if(setrlimit(RLIMIT_NOFILE, &rl)) return -1;
	*soft_after = (size_t)rl.rlim_cur;
	return enough ? 0 : -1;
}
