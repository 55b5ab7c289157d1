"""The decode thread governor: runs the faster team size it measured, re-measures the other one
less and less often while it keeps losing, and restores the team size when done."""
from __future__ import annotations

import pytest
import torch

from qat.kernels.threads import FIRST_PROBE, ThreadGovernor


class Machine:
    """A fake clock whose steps take `cost[threads]` seconds; records the team sizes applied."""

    def __init__(self, cost: dict[int, float]):
        self.cost, self.now, self.applied = cost, 0.0, []

    def clock(self) -> float:
        return self.now

    def set_threads(self, n: int) -> None:
        self.applied.append(n)


def run(governor: ThreadGovernor, machine: Machine, steps: int) -> list[int]:
    for _ in range(steps):
        with governor.step() as step:
            machine.now += machine.cost[step.threads]
    return governor.history


def test_quiet_machine_keeps_two_threads_and_probes_rarely():
    machine = Machine({1: 0.020, 2: 0.012})
    governor = ThreadGovernor(machine.set_threads, 2, clock=machine.clock, start=2,
                              others=lambda: None)
    history = run(governor, machine, 1000)
    assert history[:FIRST_PROBE] == [2] * FIRST_PROBE
    assert history.count(1) <= 12  # a few probes, backing off: ~1% of the steps
    assert governor.choice == 2
    governor.close()
    assert machine.applied[-1] == 2


def test_loaded_machine_moves_to_one_thread_and_stays():
    machine = Machine({1: 0.2, 2: 3.0})  # two threads collapse at every barrier
    governor = ThreadGovernor(machine.set_threads, 2, clock=machine.clock, start=2,
                              others=lambda: None)
    history = run(governor, machine, 1000)
    assert governor.choice == 1
    assert history[FIRST_PROBE + 2:].count(2) <= 12
    assert all(n == 1 for n in history[FIRST_PROBE + 2:FIRST_PROBE + 2 + 64])


def test_load_that_comes_and_goes_is_followed():
    machine = Machine({1: 0.02, 2: 0.012})
    governor = ThreadGovernor(machine.set_threads, 2, clock=machine.clock, start=2, interval=16,
                              others=lambda: None)
    run(governor, machine, 100)
    assert governor.choice == 2
    machine.cost = {1: 0.2, 2: 3.0}
    run(governor, machine, 200)
    assert governor.choice == 1
    machine.cost = {1: 0.02, 2: 0.012}
    run(governor, machine, 1200)
    assert governor.choice == 2


def test_fixed_team_size_and_a_single_core():
    machine = Machine({1: 0.02, 2: 0.01})
    fixed = ThreadGovernor(machine.set_threads, 2, clock=machine.clock, start=1, adapt=False)
    assert set(run(fixed, machine, 300)) == {1}
    single = ThreadGovernor(machine.set_threads, 1, clock=machine.clock)
    assert set(run(single, machine, 300)) == {1}


def test_greedy_tokens_do_not_depend_on_the_team_size(tmp_path):
    from qat.serve.decode import greedy
    from qat.export.load import load_quantized
    from qat.export.writer import export_model
    from qat import native
    from qat.models import ModelSpec
    from qat.models.tiny import tiny_model, tiny_tokenizer
    from qat.quant import QuantConfig, WeightSpec, prepare

    if not native.available():
        pytest.skip("no native kernels on this machine")
    tokenizer = tiny_tokenizer(512)
    model = tiny_model(ModelSpec(name="tiny"), tokenizer)
    prepare(model, QuantConfig(weight=WeightSpec(bits=4, group_size=64)))
    export_model(model, tokenizer, tmp_path / "e")
    served = load_quantized(tmp_path / "e", dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 2]])
    before = native.max_threads()
    tokens = {n: greedy(served, ids, 24, threads=n) for n in (1, before, None)}
    assert all(torch.equal(t, tokens[1]) for t in tokens.values())
    assert native.max_threads() == before  # restored after each call


def test_instantaneous_load_skips_measurements_whose_outcome_it_tells():
    machine, others = Machine({1: 0.02, 2: 0.012}), [0]
    governor = ThreadGovernor(machine.set_threads, 2, clock=machine.clock, start=2,
                              others=lambda: others[0], cores=2)
    assert set(run(governor, machine, 300)) == {2}  # nobody else runs: never tries one thread
    machine.cost, others[0] = {1: 0.2, 2: 3.0}, 4
    governor.choice = 1
    assert set(run(governor, machine, 300)[300:]) == {1}  # cores taken: never tries two


def test_first_choice_leaves_the_cores_others_hold(monkeypatch):
    from qat.kernels import threads

    for others, want in ((0, 2), (1, 1), (4, 1)):
        monkeypatch.setattr(threads, "running_elsewhere", lambda n=others: n)
        assert threads.first_choice(2, 2) == want
    monkeypatch.setattr(threads, "running_elsewhere", lambda: 0)
    assert threads.first_choice(4, 8) == 4


def test_processes_arriving_and_leaving_trigger_a_measurement_at_once():
    machine, others = Machine({1: 0.02, 2: 0.012}), [0]
    governor = ThreadGovernor(machine.set_threads, 2, clock=machine.clock, start=2,
                              others=lambda: others[0], cores=2)
    run(governor, machine, 100)
    machine.cost, others[0] = {1: 0.2, 2: 3.0}, 4
    history = run(governor, machine, 20)[100:]
    assert governor.choice == 1 and history.count(2) <= 8 + 1  # switched within a check period
    machine.cost, others[0] = {1: 0.02, 2: 0.012}, 0
    run(governor, machine, 20)
    assert governor.choice == 2
