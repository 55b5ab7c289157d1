"""How many threads a decode step uses, chosen from the step times themselves.

Used where a token is not one native call (the head stays in torch): a token that is (the int8
head, qat.serve.decode) runs on csrc/team.c's team, whose threads never wait for each other, at
its full size.

Why: a decode step is ~120 short parallel loops (four per decoder layer), each ending in a barrier.
On a quiet machine two threads beat one; when other processes hold the cores, a thread that is
descheduled makes its partner wait at every barrier for a whole scheduler slice, and the step
collapses (measured: 0.34 tok/s with 2 threads against 4.5 with 1 at load ~19 on 2 cores). The
scheduler's load average lags by a minute, so the governor looks at the kernel's instantaneous count
of running threads every other step: other processes on every core -> one thread, none -> all of
them. In between (some cores taken) it times the steps: it runs the faster team size it measured
and re-measures the other one for a couple of steps now and then, backing off while it keeps losing.
"""
from __future__ import annotations

import os
import time

ALPHA = 0.3  # weight of the newest step in each team size's running time
FIRST_PROBE = 4  # steps before the first measurement of the other team size
PROBE_STEPS = 2  # steps per measurement (the first after a switch warms the new team up)
MAX_INTERVAL = 1024
CHECK_EVERY = 2  # steps between looks at the instantaneous load (~50 us each)


def running_elsewhere() -> int | None:
    """Threads of other processes running or runnable right now (the kernel's instantaneous count,
    /proc/loadavg's fourth field, less this process's own running threads); None where unknown."""
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
        ours = 0
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/stat") as f:
                ours += f.read().rsplit(")", 1)[1].split()[0] == "R"
    except (OSError, ValueError, IndexError):
        return None
    return max(0, running - ours)


def first_choice(most: int, cores: int) -> int:
    """The team size to start from: what the cores left by other processes hold."""
    others = running_elsewhere()
    if others is None:
        try:
            others = int(os.getloadavg()[0])
        except OSError:
            others = 0
    return max(1, min(most, cores - others))


class ThreadGovernor:
    """`with governor.step(): ...` around each decode step; `close()` restores the team size.

    `set_threads(n)` applies a team size (qat.native.set_threads); `most` is the largest;
    `start` the first choice (default: the cores other processes leave); `adapt=False` keeps it;
    `others()` counts other processes' running threads (None: unknown, always measure).
    """

    def __init__(self, set_threads, most: int, interval: int = 64, clock=time.perf_counter,
                 start: int | None = None, adapt: bool = True, others=running_elsewhere,
                 cores: int | None = None):
        self.set_threads, self.most, self.clock, self.adapt = set_threads, max(1, most), clock, adapt
        self.others, self.cores = others, cores or os.cpu_count() or 1
        self.base = self.interval = interval
        self.choice = start if start is not None else first_choice(self.most, self.cores)
        self.times: dict[int, float] = {}
        self.until_probe, self.probing, self.current, self.steps = FIRST_PROBE, 0, None, 0
        self.suspect = 0  # consecutive looks at the load that disagree with the choice
        self.history: list[int] = []  # team size of each step (for tests and reports)

    def _apply(self, n: int) -> None:
        if n != self.current:
            self.set_threads(n)
            self.current = n

    def step(self) -> "_Step":
        self.steps += 1
        if self.adapt and self.most > 1 and not self.probing and self.steps % CHECK_EVERY == 0:
            self._check_load()
        if self.most == 1 or not self.adapt:
            threads = self.choice
        elif self.probing:
            threads = self._other()
        elif self.until_probe <= 0 and self._worth_probing():
            self.probing, threads = PROBE_STEPS, self._other()
        else:
            threads = self.choice
        self._apply(threads)
        return _Step(self, threads)

    def begin(self) -> None:
        """At the start of a decode call: look at the load at once (it may have changed since)."""
        if self.adapt and self.most > 1 and not self.probing:
            self._check_load()

    def _check_load(self) -> None:
        """Follow the instantaneous load where it decides alone: other processes on every core ->
        one thread; none -> all of them. Two looks in a row must agree (a kernel thread or a
        short job shows up in one); what is in between is left to the measured times."""
        others = self.others()
        target = None if others is None else \
            1 if others >= self.cores else self.most if others == 0 else None
        if target is None or target == self.choice:
            self.suspect = 0
            return
        self.suspect += 1
        if self.suspect >= 2:
            self.choice, self.suspect, self.until_probe = target, 0, self.interval
            self.times.clear()  # measured under another load

    def _worth_probing(self) -> bool:
        """Skip a measurement whose outcome the instantaneous load already tells: with no other
        process running the larger team wins; with the cores taken it loses (and costs most)."""
        others = self.others()
        if others is not None and (others == 0 if self.choice == self.most
                                   else others + self.most > self.cores):
            self.until_probe = self.interval
            return False
        return True

    def _other(self) -> int:
        return 1 if self.choice == self.most else self.most

    def record(self, threads: int, seconds: float) -> None:
        self.history.append(threads)
        if self.most == 1 or not self.adapt:
            return
        if threads == self.choice:  # a running time over the steps of the chosen size
            old = self.times.get(threads)
            self.times[threads] = seconds if old is None else (1 - ALPHA) * old + ALPHA * seconds
            self.until_probe -= 1
            return
        if self.probing < PROBE_STEPS:  # a probe: fresh, so it replaces what the size had
            self.times[threads] = seconds   # (its first step after the switch only warms up)
        self.probing -= 1
        if self.probing:
            return
        if self.times.get(threads, float("inf")) < self.times.get(self.choice, float("inf")):
            self.choice, self.interval = threads, self.base  # the other size won: switch
        else:
            self.interval = min(2 * self.interval, MAX_INTERVAL)  # it lost again: ask less often
        self.until_probe = self.interval

    def close(self) -> None:
        self._apply(self.most)


class _Step:
    def __init__(self, governor: ThreadGovernor, threads: int):
        self.governor, self.threads = governor, threads

    def __enter__(self) -> "_Step":
        self.start = self.governor.clock()
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.governor.record(self.threads, self.governor.clock() - self.start)
