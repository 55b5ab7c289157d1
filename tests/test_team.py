"""csrc/team.c through the native decode step: any team size, and threads that compute each
other's chunks, give the same bits; with the int8 head a token is the head's argmax."""
from __future__ import annotations

import os
import time

import pytest
import torch

from qat import native
from qat.export.load import load_quantized
from qat.export.writer import export_model
from qat.quant import QuantConfig, WeightSpec, prepare
from qat.serve.decode import greedy, native_step, new_caches

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler or AVX2/FMA")


@pytest.fixture
def served(tiny_llama, tmp_path):
    with torch.no_grad():
        for p in tiny_llama.parameters():
            p.mul_(4)  # peaked next-token distributions: no argmax ties
    prepare(tiny_llama, QuantConfig(weight=WeightSpec(bits=4, group_size=64, symmetric=False)))
    export_model(tiny_llama, None, tmp_path / "e", dtype=torch.float32)
    return load_quantized(tmp_path / "e", dtype=torch.float32, embedding_bits=8)


def _run(model, ids, threads):
    """Every position of ids through a fresh native step: (h after each, tokens, caches)."""
    caches = new_caches(model, ids.shape[1], torch.float32)
    step = native_step(model, caches)
    hs, tokens = [], []
    with torch.no_grad():
        for t in range(ids.shape[1]):
            h = model.model.embed_tokens(ids[:, t]).reshape(-1).contiguous()
            tokens.append(step(h, t, threads=threads))
            hs.append(h)
    step.close()
    return torch.stack(hs), tokens, caches


def test_the_int8_head_runs_in_the_step_and_returns_its_argmax(served):
    ids = torch.randint(0, 300, (1, 10), generator=torch.Generator().manual_seed(5))
    assert native_step(served, new_caches(served, 10, torch.float32)).head is not None
    hs, tokens, _ = _run(served, ids, 1)
    with torch.no_grad():
        expected = served.lm_head(served.model.norm(hs)).argmax(-1)
    assert tokens == expected.tolist()


@pytest.mark.parametrize("threads,patience", [(2, None), (5, None), (2, 0), (5, 0)])
def test_team_size_and_stolen_chunks_change_no_bit(served, threads, patience):
    """patience 0: a thread that finds a chunk claimed computes it too, so chunks run twice and
    commits race; oversubscribed teams (5 threads on few cores) get descheduled mid-chunk."""
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(6))
    alone = _run(served, ids, 1)
    native.team_patience(patience)
    try:
        for _ in range(3):
            hs, tokens, caches = _run(served, ids, threads)
            assert torch.equal(hs, alone[0]) and tokens == alone[1]
            for (k, v), (k1, v1) in zip(caches, alone[2]):
                assert torch.equal(k, k1) and torch.equal(v, v1)
    finally:
        native.team_patience(None)


def test_greedy_through_the_team_matches_the_torch_loop(served):
    ids = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(7))
    reference = greedy(served, ids, 30, native=False)
    for threads in (None, 1, 2, 3):
        assert torch.equal(greedy(served, ids, 30, threads=threads), reference)


def test_a_forked_child_decodes_on_its_own_team(served):
    """Servers fork workers after the parent has decoded: the child must not wait for helper
    threads that fork did not copy, and its new team must give the parent's tokens."""
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(8))
    expected = _run(served, ids, 2)[1]  # the parent's helpers exist now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report tokens, never return into pytest
        code = 1
        try:
            os.close(read)
            os.write(write, repr(_run(served, ids, 2)[1]).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    deadline = time.monotonic() + 120
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's decode hung")
    with os.fdopen(read) as f:
        reported = f.read()
    assert os.waitstatus_to_exitcode(done[1]) == 0
    assert reported == repr(expected)
