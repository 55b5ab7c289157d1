/* The team of team.h. State is process-wide: one job runs at a time (a mutex orders callers).
 *
 * Protocol. Phases of all jobs are numbered by one increasing counter. `claim` holds the current
 * phase and its next unclaimed chunk; `done[c]` is 2p once chunk c of phase p is committed and
 * 2p + 1 while it is being copied. A thread claims chunks with a compare-and-swap on `claim`,
 * a share of what is left at a time (guided: a quarter of it per team thread, at least one), so
 * the shared word moves between cores a few times per phase and not once per chunk; it computes
 * them in order and skips those that a waiting thread has committed. When none is left it waits
 * for the uncommitted ones (stealing a chunk whose owner seems to be descheduled) and, once all are committed, moves `claim` to the next phase. A thread holding a
 * stale view fails its compare-and-swaps and leaves: phases never go back.
 *
 * Helpers sleep on a futex between jobs after spinning for SPIN_NS; the job is published in a
 * seqlock-guarded slot, which helpers copy before they read it.
 */
#define _GNU_SOURCE
#include "team.h"

#include <immintrin.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAX_HELPERS 63
#define CHUNK_BITS 24
#define CHUNK_MASK ((1LL << CHUNK_BITS) - 1)
#define SPIN_NS 50000          /* a helper's spin before it sleeps between jobs */
#define STEAL_MIN_NS 10000     /* the shortest wait before computing another thread's chunk */
#define STEAL_UNKNOWN_NS 200000 /* the wait when this thread has not timed the phase's kind */

static _Alignas(64) _Atomic int64_t claim;
static _Alignas(64) _Atomic int64_t done[TEAM_MAX_CHUNKS];
static _Alignas(64) _Atomic uint32_t generation; /* odd while the slot is written */
static _Alignas(64) _Atomic int sleepers;
static _Atomic int busy[MAX_HELPERS];
static TeamJob slot;
static int64_t slot_base;
static int slot_team;

static _Atomic int64_t patience_set = -1; /* qat_team_patience */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int helpers;
static int64_t next_base = 1;
static float *main_scratch;
static int64_t main_capacity;

typedef struct {
    double estimate[TEAM_KINDS]; /* ns per chunk of each kind, as this thread measured */
} Timing;

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void commit(int64_t p, int64_t c, const TeamCommit *out) {
    int64_t d = atomic_load(&done[c]);
    if (d >= 2 * p || !atomic_compare_exchange_strong(&done[c], &d, 2 * p + 1))
        return; /* committed (or being committed) by another thread */
    for (int i = 0; i < out->n; i++) memcpy(out->seg[i].dst, out->seg[i].src, out->seg[i].bytes);
    atomic_store(&done[c], 2 * p);
}

static void compute(const TeamJob *job, int64_t p, int64_t local, int64_t c, float *scratch) {
    TeamCommit out = {0};
    job->run(job->ctx, local, c, scratch, &out);
    commit(p, c, &out);
}

/* Chunks [c0, c1) of phase p, skipping those a waiting thread has committed; the time per chunk
 * updates this thread's estimate for the phase's kind (one clock read per run of chunks). */
static void compute_run(const TeamJob *job, int64_t p, int64_t local, int64_t c0, int64_t c1,
                        float *scratch, Timing *timing) {
    int64_t start = now_ns(), computed = 0;
    for (int64_t c = c0; c < c1; c++)
        if (atomic_load(&done[c]) < 2 * p) {
            compute(job, p, local, c, scratch);
            computed++;
        }
    if (!computed) return;
    double spent = (double)(now_ns() - start) / (double)computed;
    double *e = &timing->estimate[job->kind(job->ctx, local)];
    *e = *e == 0 ? spent : 0.8 * *e + 0.2 * spent;
}

/* Waits for chunk c of phase p to be committed by the thread that claimed it; computes it here
 * when that takes much longer than the chunk should (its owner is not running). */
static void wait_or_steal(const TeamJob *job, int64_t p, int64_t local, int64_t c, float *scratch,
                          Timing *timing) {
    double e = timing->estimate[job->kind(job->ctx, local)];
    int64_t patience = atomic_load(&patience_set);
    if (patience < 0) patience = e == 0 ? STEAL_UNKNOWN_NS : (int64_t)(3 * e) + STEAL_MIN_NS;
    int64_t start = now_ns();
    for (int spins = 1;; spins++) {
        int64_t d = atomic_load(&done[c]);
        if (d >= 2 * p + 1) {
            if (d == 2 * p + 1) { /* being copied: a few hundred ns */
                _mm_pause();
                continue;
            }
            return;
        }
        if ((atomic_load(&claim) >> CHUNK_BITS) != p) return;
        _mm_pause();
        if ((patience == 0 || spins % 32 == 0) && now_ns() - start >= patience) {
            compute_run(job, p, local, c, c + 1, scratch, timing);
            return;
        }
    }
}

static _Thread_local Timing timing; /* kept across jobs: a thread's first wait is informed too */

static void work(const TeamJob *job, int64_t base, int team, float *scratch) {
    int64_t last = base + job->phases, pending = 0, seen = 0, n = 0; /* phase `seen` has n
                                                        chunks, those before `pending` committed */
    for (;;) {
        int64_t w = atomic_load(&claim), p = w >> CHUNK_BITS, next = w & CHUNK_MASK;
        if (p < base || p >= last) return;
        int64_t local = p - base;
        if (p != seen) seen = p, pending = 0, n = job->chunks(job->ctx, local);
        if (next < n) { /* a share of what is left (guided): fewer claims on the shared word */
            int64_t take = (n - next) / (4 * team);
            take = take < 1 ? 1 : take;
            if (atomic_compare_exchange_weak(&claim, &w, w + take))
                compute_run(job, p, local, next, next + take, scratch, &timing);
            continue;
        }
        while (pending < n && atomic_load(&done[pending]) == 2 * p) pending++;
        if (pending == n) {
            atomic_compare_exchange_strong(&claim, &w, (p + 1) << CHUNK_BITS);
            continue;
        }
        wait_or_steal(job, p, local, pending, scratch, &timing);
    }
}

static void futex(_Atomic uint32_t *word, int op, uint32_t value) {
    syscall(SYS_futex, (uint32_t *)word, op, value, NULL, NULL, 0);
}

static void *helper_main(void *arg) {
    int id = (int)(intptr_t)arg;
    float *scratch = NULL;
    int64_t capacity = 0;
    uint32_t seen = 0;
    for (;;) {
        int64_t start = now_ns();
        for (int spins = 1; atomic_load(&generation) == seen; spins++) {
            _mm_pause();
            if (spins % 64 == 0 && now_ns() - start > SPIN_NS) {
                atomic_fetch_add(&sleepers, 1);
                if (atomic_load(&generation) == seen)
                    futex(&generation, FUTEX_WAIT_PRIVATE, seen);
                atomic_fetch_sub(&sleepers, 1);
                start = now_ns();
            }
        }
        atomic_store(&busy[id], 1);
        uint32_t g = atomic_load(&generation);
        TeamJob job;
        int64_t base;
        int team;
        if (g & 1) { /* being written */
            atomic_store(&busy[id], 0);
            continue;
        }
        memcpy(&job, &slot, sizeof job);
        base = slot_base;
        team = slot_team;
        atomic_thread_fence(memory_order_acquire);
        if (atomic_load(&generation) != g) {
            atomic_store(&busy[id], 0);
            continue;
        }
        seen = g;
        if (id + 1 < team && job.scratch_floats > capacity) {
            free(scratch);
            scratch = malloc(sizeof(float) * job.scratch_floats);
            capacity = scratch ? job.scratch_floats : 0;
        }
        if (id + 1 < team && scratch) work(&job, base, team, scratch);
        atomic_store(&busy[id], 0);
    }
    return NULL;
}

static void publish(const TeamJob *job, int64_t base, int team) {
    atomic_fetch_add(&generation, 1);
    atomic_thread_fence(memory_order_release);
    memcpy(&slot, job, sizeof slot);
    slot_base = base;
    slot_team = team;
    atomic_thread_fence(memory_order_release);
    atomic_fetch_add(&generation, 1);
    if (atomic_load(&sleepers)) futex(&generation, FUTEX_WAKE_PRIVATE, INT_MAX);
}

/* A forked child has none of the parent's helpers: its first job starts its own. */
static void before_fork(void) { pthread_mutex_lock(&lock); }
static void after_fork_parent(void) { pthread_mutex_unlock(&lock); }
static void after_fork_child(void) {
    helpers = 0;
    atomic_store(&sleepers, 0);
    for (int i = 0; i < MAX_HELPERS; i++) atomic_store(&busy[i], 0);
    pthread_mutex_unlock(&lock);
}
static pthread_once_t fork_handlers = PTHREAD_ONCE_INIT;
static void install_fork_handlers(void) {
    pthread_atfork(before_fork, after_fork_parent, after_fork_child);
}

int team_run(const TeamJob *job, int threads) {
    pthread_once(&fork_handlers, install_fork_handlers);
    pthread_mutex_lock(&lock);
    if (threads > MAX_HELPERS + 1) threads = MAX_HELPERS + 1;
    while (helpers < threads - 1) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&t, &attr, helper_main, (void *)(intptr_t)helpers);
        pthread_attr_destroy(&attr);
        if (failed) break;
        helpers++;
    }
    if (threads > helpers + 1) threads = helpers + 1;
    if (job->scratch_floats > main_capacity) {
        free(main_scratch);
        main_scratch = malloc(sizeof(float) * job->scratch_floats);
        main_capacity = main_scratch ? job->scratch_floats : 0;
        if (!main_scratch) {
            pthread_mutex_unlock(&lock);
            return -1;
        }
    }
    int64_t base = next_base;
    next_base += job->phases + 1;
    atomic_store(&claim, base << CHUNK_BITS);
    if (threads > 1) publish(job, base, threads);
    work(job, base, threads, main_scratch);
    pthread_mutex_unlock(&lock);
    return 0;
}

void qat_team_quiesce(void) {
    pthread_mutex_lock(&lock);
    for (int i = 0; i < helpers; i++)
        while (atomic_load(&busy[i])) sched_yield();
    pthread_mutex_unlock(&lock);
}

void qat_team_patience(int64_t ns) { atomic_store(&patience_set, ns); }
