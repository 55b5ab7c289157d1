"""Who writes a run's files before a Trainer exists: rank zero by the launcher's variables."""
import pytest

from qat.io import is_rank_zero

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


@pytest.fixture
def no_launcher(monkeypatch):
    for key in RANK_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_no_launcher_is_rank_zero(no_launcher):
    assert is_rank_zero()


@pytest.mark.parametrize("key", RANK_VARIABLES)
def test_each_launcher_variable_is_read(no_launcher, key):
    no_launcher.setenv(key, "1")
    assert not is_rank_zero()
    no_launcher.setenv(key, "0")
    assert is_rank_zero()


def test_the_first_variable_set_wins_as_in_lightning(no_launcher):
    """SLURM_PROCID can be set without SLURM launching the processes: RANK / LOCAL_RANK first."""
    from lightning.fabric.utilities.rank_zero import _get_rank

    no_launcher.setenv("LOCAL_RANK", "0")
    no_launcher.setenv("SLURM_PROCID", "3")
    assert _get_rank() == 0 and is_rank_zero()
