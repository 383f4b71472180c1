/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* tcp_nodelay.c - LD_PRELOAD for a benchmark peer: TCP_NODELAY on every TCP socket it connects.
 *
 * Mosquitto 2.0's built-in bridge leaves Nagle's algorithm on (set_tcp_nodelay covers only the
 * clients the broker accepts): behind an unacknowledged segment its next small PUBLISH waits for the TCP ACK, which
 * from a broker across a WAN is a round trip away. The benchmark shows that bridge as shipped
 * and, with this shim, as it would be tuned, to tell Nagle's share from the rest. */
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <stddef.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

typedef int (*connect_fn)(int, const struct sockaddr *, socklen_t);

int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
	connect_fn real = (connect_fn)dlsym(RTLD_NEXT, "connect");
	if(real == NULL){
		errno = ENOSYS;
		return -1;
	}
	if(addr && (addr->sa_family == AF_INET || addr->sa_family == AF_INET6)){
		int one = 1, saved = errno;
		(void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));   /* not TCP: harmless */
		errno = saved;
	}
	return real(fd, addr, len);
}
