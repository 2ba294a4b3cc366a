#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <libtpms/tpm_library.h>
#include "_cgo_export.h"
#include "glue.h"

/*
 * The engine lock. Every libtpms call holds it: Go takes it (after the Engine's own mutex)
 * around each call, a native data thread around each command it runs itself. A semaphore, not
 * a mutex, because a goroutine may be moved to another thread between its lock and unlock.
 */
static sem_t engine_sem;
static int engine_armed;      /* guarded by engine_sem: a data thread may run the next command */
static uint32_t last_cc;      /* guarded by engine_sem */
static int nv_failed;         /* guarded by engine_sem: a store callback failed in this command */
static uint32_t cur_locality; /* atomic: libtpms' locality, process-global */

void vtpmd_engine_init(void) { sem_init(&engine_sem, 0, 1); }

/* vtpmd_engine_lock_keep takes the engine lock without disarming it (a data thread). */
void vtpmd_engine_lock_keep(void) {
	while (sem_wait(&engine_sem) != 0 && errno == EINTR)
		;
}

void vtpmd_engine_lock(void) {
	vtpmd_engine_lock_keep();
	engine_armed = 0;
}

void vtpmd_engine_unlock(int arm) {
	engine_armed = arm;
	sem_post(&engine_sem);
}

void vtpmd_set_last_cc(uint32_t cc) { last_cc = cc; }
uint32_t vtpmd_last_cc(void) { return last_cc; }
void vtpmd_set_locality(uint32_t l) { __atomic_store_n(&cur_locality, l, __ATOMIC_SEQ_CST); }
uint32_t vtpmd_locality(void) { return __atomic_load_n(&cur_locality, __ATOMIC_SEQ_CST); }

/* const-correct trampolines from libtpms' callback types to the Go exports */
static TPM_RESULT nv_init(void) { return goNvInit(); }
static TPM_RESULT nv_load(unsigned char **d, uint32_t *l, uint32_t n, const char *name) {
	return goNvLoad(d, l, n, (char *)name);
}
static TPM_RESULT nv_store(const unsigned char *d, uint32_t l, uint32_t n, const char *name) {
	TPM_RESULT rc = goNvStore((unsigned char *)d, l, n, (char *)name);
	if (rc != TPM_SUCCESS)
		nv_failed = 1;
	return rc;
}
static TPM_RESULT nv_delete(uint32_t n, const char *name, TPM_BOOL mustExist) {
	return goNvDelete(n, (char *)name, mustExist);
}
static TPM_RESULT io_init(void) { return TPM_SUCCESS; }
static TPM_RESULT io_getlocality(TPM_MODIFIER_INDICATOR *loc, uint32_t n) {
	(void)n;
	*loc = (TPM_MODIFIER_INDICATOR)vtpmd_locality();
	return TPM_SUCCESS;
}

int vtpmd_register_callbacks(void) {
	struct libtpms_callbacks cbs = {
		.sizeOfStruct = sizeof(struct libtpms_callbacks),
		.tpm_nvram_init = nv_init,
		.tpm_nvram_loaddata = nv_load,
		.tpm_nvram_storedata = nv_store,
		.tpm_nvram_deletename = nv_delete,
		.tpm_io_init = io_init,
		.tpm_io_getlocality = io_getlocality,
	};
	return TPMLIB_RegisterCallbacks(&cbs);
}

/*
 * The native data thread: one per data connection. It reads a message, runs it in libtpms
 * itself when the engine is armed and the message is a plain TPM 2 command, and otherwise
 * hands it to Go (goDataMessage), which answers it the way the Go data path does. Framing is
 * the Go path's: one read is one message; a read shorter than a TPM header is continued for at
 * most partial_window_ms.
 */

enum {
	header_size = 10,
	partial_window_ms = 500,
	cc_set_locality = 0x20001000,
};

struct data_thread {
	int fd;
	uintptr_t handle;
	unsigned char *buf;
	size_t cap;
	uint32_t *to_go; /* command codes that always go to Go (a guard's) */
	size_t n_to_go;
};

static int goes_to_go(const struct data_thread *t, uint32_t cc) {
	for (size_t i = 0; i < t->n_to_go; i++)
		if (t->to_go[i] == cc)
			return 1;
	return 0;
}

static int64_t now_ms(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* read_msg returns the message's length, or -1 when the connection is gone. */
static ssize_t read_msg(int fd, unsigned char *buf, size_t cap) {
	ssize_t n;
	do
		n = read(fd, buf, cap);
	while (n < 0 && errno == EINTR);
	if (n <= 0)
		return -1;
	int64_t deadline = now_ms() + partial_window_ms;
	while (n < header_size) {
		int64_t left = deadline - now_ms();
		if (left <= 0)
			break;
		struct pollfd p = {.fd = fd, .events = POLLIN};
		int r = poll(&p, 1, (int)left);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			break; /* the window passed: answer what arrived */
		ssize_t m = read(fd, buf + n, cap - (size_t)n);
		if (m < 0 && errno == EINTR)
			continue;
		if (m <= 0)
			return -1;
		n += m;
	}
	return n;
}

/* vtpmd_send_all sends all of b; 0, or the errno that stopped it. */
int vtpmd_send_all(int fd, const unsigned char *b, size_t n) {
	while (n > 0) {
		ssize_t m = send(fd, b, n, MSG_NOSIGNAL);
		if (m < 0 && errno == EINTR)
			continue;
		if (m < 0)
			return errno;
		if (m == 0)
			return EPIPE;
		b += m;
		n -= (size_t)m;
	}
	return 0;
}

static uint32_t be32(const unsigned char *b) {
	return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
}

/* TPM_RC_FAILURE, as the Go path answers a command libtpms could not run */
static const unsigned char fatal_response[header_size] = {0x80, 0x01, 0, 0, 0, 10, 0, 0, 0x01, 0x01};

static void *data_thread_main(void *arg) {
	struct data_thread *t = arg;
	unsigned char *rbuf = NULL;
	uint32_t rlen = 0, rcap = 0;
	for (;;) {
		ssize_t n = read_msg(t->fd, t->buf, t->cap);
		if (n < 0)
			break;
		if (n >= header_size && t->buf[0] == 0x80 && (t->buf[1] == 0x01 || t->buf[1] == 0x02) &&
		    be32(t->buf + 6) != cc_set_locality && !goes_to_go(t, be32(t->buf + 6))) {
			vtpmd_engine_lock_keep();
			if (engine_armed) {
				nv_failed = 0;
				last_cc = be32(t->buf + 6);
				rlen = 0;
				TPM_RESULT rc = TPMLIB_Process(&rbuf, &rlen, &rcap, t->buf, (uint32_t)n);
				if (rc != TPM_SUCCESS || nv_failed) {
					engine_armed = 0;
					goDataError(t->handle, rc); /* logs; the engine lock is still held */
					sem_post(&engine_sem);
					if (vtpmd_send_all(t->fd, fatal_response, sizeof fatal_response) != 0)
						break;
					continue;
				}
				sem_post(&engine_sem);
				if (vtpmd_send_all(t->fd, rbuf, rlen) != 0)
					break;
				continue;
			}
			sem_post(&engine_sem);
		}
		if (goDataMessage(t->handle, t->buf, (uint32_t)n) != 0)
			break;
	}
	free(rbuf);
	free(t->to_go);
	free(t->buf);
	uintptr_t h = t->handle;
	free(t);
	goDataDone(h);
	return NULL;
}

int vtpmd_start_data_thread(int fd, uintptr_t handle, size_t cap, const uint32_t *to_go, size_t n_to_go) {
	struct data_thread *t = calloc(1, sizeof *t);
	if (t == NULL)
		return ENOMEM;
	t->buf = malloc(cap);
	t->to_go = n_to_go ? malloc(n_to_go * sizeof *to_go) : NULL;
	if (t->buf == NULL || (n_to_go && t->to_go == NULL)) {
		free(t->buf);
		free(t->to_go);
		free(t);
		return ENOMEM;
	}
	if (n_to_go)
		memcpy(t->to_go, to_go, n_to_go * sizeof *to_go);
	t->n_to_go = n_to_go;
	t->fd = fd;
	t->handle = handle;
	t->cap = cap;
	pthread_attr_t attr;
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	/* signals stay with the Go runtime's threads */
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &old);
	pthread_t th;
	int err = pthread_create(&th, &attr, data_thread_main, t);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	pthread_attr_destroy(&attr);
	if (err != 0) {
		free(t->buf);
		free(t->to_go);
		free(t);
	}
	return err;
}
