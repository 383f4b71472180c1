/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* late_acks.c - LD_PRELOAD for the upstream broker of a benchmark: its acknowledgements arrive
 * as from a broker across a WAN, while the data path stays local.
 *
 * A write() of at most AKZ_ACK_MAX bytes (default 40) to a socket goes out AKZ_ACK_DELAY_MS
 * later from a helper thread; so does every later write to that socket while one is held, which
 * keeps each stream in order. A PUBACK, PINGRESP, CONNACK or SUBACK in a TLS record is 24 to 40
 * bytes; a PUBLISH to a subscriber is larger, so the upstream's deliveries are not delayed.
 * Why: on loopback, a PUBACK comes back within ~50 us, while the upstream and the subscriber
 * are still working on the uplink it acknowledges, and on two cores its wake-up of the edge
 * competes with them. From mqtt.akenza.io it comes one round trip later. Without the variable
 * (or with 0, or if the helper thread cannot start) every write goes straight through. */
#include <dlfcn.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAX_FD 65536
#define CLOSE_WAIT_MS 1000   /* close() waits this long at most for the socket's held writes */

struct held {
	struct held *next;
	int fd;
	int64_t due_ns;
	size_t len;
	unsigned char data[];
};

typedef ssize_t (*write_fn)(int, const void *, size_t);
typedef int (*close_fn)(int);

static write_fn real_write;
static close_fn real_close;
static pthread_once_t once = PTHREAD_ONCE_INIT;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t queued = PTHREAD_COND_INITIALIZER;
/* One FIFO for all sockets: every write waits the same time, so it is also in due order. */
static struct held *head, *tail;
static int held_count[MAX_FD];   /* per socket, under lock */
static int64_t delay_ns;         /* 0: off */
static size_t max_len = 40;

static int64_t now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* Writes all of it, waiting for room on a non-blocking socket; gives up on any other error (the
 * broker finds the broken connection by itself). */
static void write_all(int fd, const unsigned char *p, size_t len)
{
	while(len > 0){
		ssize_t n = real_write(fd, p, len);
		if(n > 0){
			p += n;
			len -= (size_t)n;
		}else if(n < 0 && (errno == EAGAIN || errno == EINTR)){
			struct pollfd pfd = {.fd = fd, .events = POLLOUT};
			(void)poll(&pfd, 1, 100);
		}else{
			return;
		}
	}
}

/* The helper thread: writes each held buffer when it is due. Never returns. */
static void *send_late(void *arg)
{
	(void)arg;
	for(;;){
		pthread_mutex_lock(&lock);
		while(head == NULL) pthread_cond_wait(&queued, &lock);
		struct held *h = head;
		int64_t wait = h->due_ns - now_ns();
		if(wait <= 0){
			head = h->next;
			if(head == NULL) tail = NULL;
		}
		pthread_mutex_unlock(&lock);
		if(wait > 0){
			struct timespec ts = {.tv_sec = wait / 1000000000LL, .tv_nsec = wait % 1000000000LL};
			(void)nanosleep(&ts, NULL);
			continue;
		}
		write_all(h->fd, h->data, h->len);
		pthread_mutex_lock(&lock);
		held_count[h->fd]--;   /* only now may the broker's writes to it go straight again */
		pthread_mutex_unlock(&lock);
		free(h);
	}
	return NULL;
}

static void init(void)
{
	real_write = (write_fn)dlsym(RTLD_NEXT, "write");
	real_close = (close_fn)dlsym(RTLD_NEXT, "close");
	const char *d = getenv("AKZ_ACK_DELAY_MS"), *m = getenv("AKZ_ACK_MAX");
	if(m) max_len = strtoul(m, NULL, 10);
	int64_t ns = d ? (int64_t)(strtod(d, NULL) * 1e6) : 0;
	pthread_t t;
	if(ns > 0 && pthread_create(&t, NULL, send_late, NULL) == 0){
		pthread_detach(t);
		delay_ns = ns;
	}
}

/* Whether fd is a socket with writes held, or this write is one to hold. */
static bool must_hold(int fd, size_t len)
{
	pthread_mutex_lock(&lock);
	bool behind = held_count[fd] > 0;
	pthread_mutex_unlock(&lock);
	if(behind) return true;
	struct stat st;
	return len <= max_len && fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode);
}

ssize_t write(int fd, const void *buf, size_t len)
{
	(void)pthread_once(&once, init);
	if(real_write == NULL){
		errno = ENOSYS;
		return -1;
	}
	if(delay_ns == 0 || fd < 0 || fd >= MAX_FD || !must_hold(fd, len)) return real_write(fd, buf, len);
	struct held *h = malloc(sizeof(*h) + len);
	if(h == NULL){
		errno = EAGAIN;   /* the broker tries again later; writing now could overtake held ones */
		return -1;
	}
	h->next = NULL;
	h->fd = fd;
	h->len = len;
	h->due_ns = now_ns() + delay_ns;
	memcpy(h->data, buf, len);
	pthread_mutex_lock(&lock);
	held_count[fd]++;
	if(tail) tail->next = h;
	else head = h;
	tail = h;
	pthread_cond_signal(&queued);
	pthread_mutex_unlock(&lock);
	return (ssize_t)len;
}

/* Lets a closing socket's held writes go first, so that its number is not reused under them. */
int close(int fd)
{
	(void)pthread_once(&once, init);
	if(real_close == NULL){
		errno = ENOSYS;
		return -1;
	}
	for(int i = 0; delay_ns && fd >= 0 && fd < MAX_FD && i < CLOSE_WAIT_MS; i++){
		pthread_mutex_lock(&lock);
		int n = held_count[fd];
		pthread_mutex_unlock(&lock);
		if(n == 0) break;
		(void)usleep(1000);
	}
	return real_close(fd);
}
