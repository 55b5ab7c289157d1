/* A team of threads that runs a job: a sequence of phases, each a set of independent chunks.
 *
 * Why not OpenMP: every OpenMP loop ends in a barrier that waits for each thread of the team, so
 * on a loaded machine a descheduled thread stalls the whole step for a scheduler slice (measured:
 * 0.34 tok/s with 2 threads against 4.5 with 1 at load ~19 on 2 cores). Here no thread waits for
 * another one: chunks are claimed a few at a time, a chunk computes into the thread's own scratch
 * and is committed (copied to its outputs) once, by whichever thread finishes it first, and a
 * thread that finds the phase's last chunks claimed but not committed for longer than they
 * should take computes them itself. The job advances whenever any thread of the team runs, so
 * a second thread adds its share of the machine instead of waiting for it.
 *
 * A job's inputs and outputs must stay alive until team_quiesce() returns (a descheduled thread
 * may still be computing a chunk that another one committed; it throws its result away).
 */
#ifndef QAT_TEAM_H
#define QAT_TEAM_H
#include <stddef.h>
#include <stdint.h>

#define TEAM_MAX_CHUNKS 8192 /* chunks per phase */
#define TEAM_SEGMENTS 4      /* outputs per chunk */
#define TEAM_KINDS 16        /* phase kinds with their own time estimate */
#define TEAM_CONTEXT 256     /* bytes of a job's context, copied by value */

typedef struct {
    int n;
    struct {
        void *dst;
        const void *src;
        size_t bytes;
    } seg[TEAM_SEGMENTS];
} TeamCommit;

typedef struct {
    /* chunks of phase p (0 <= p < phases), 1..TEAM_MAX_CHUNKS; its kind (< TEAM_KINDS) */
    int64_t (*chunks)(const void *ctx, int64_t p);
    int (*kind)(const void *ctx, int64_t p);
    /* computes chunk c of phase p into scratch (scratch_floats floats) and names its outputs;
     * it must write nothing else (it may run twice, or beside the phase's commit) */
    void (*run)(const void *ctx, int64_t p, int64_t c, float *scratch, TeamCommit *out);
    int64_t phases, scratch_floats;
    _Alignas(64) unsigned char ctx[TEAM_CONTEXT];
} TeamJob;

/* Runs every phase of the job in order with up to `threads` threads (the caller is one of them).
 * Returns 0, or -1 when out of memory. */
int team_run(const TeamJob *job, int threads);

/* Returns once no helper thread is inside a job (call before freeing what jobs pointed to). */
void qat_team_quiesce(void);

/* How long a thread waits for a claimed chunk before computing it itself; ns < 0: three times
 * its own time for a chunk of that kind plus 10 us (the default). 0 steals at once (tests). */
void qat_team_patience(int64_t ns);

#endif
