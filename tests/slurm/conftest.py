"""The session's local Slurm: started once for all Slurm tests, stopped (state removed) at the end."""

import pytest

from tests.slurm import harness


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: submits jobs to a real local Slurm (scripts/local_slurm.sh; needs root)")


@pytest.fixture(scope="session")
def local_slurm(tmp_path_factory):
    reason = harness.why_not_available()
    if reason:
        pytest.skip(reason)
    slurm = harness.start(tmp_path_factory.mktemp("slurm-state"))
    try:
        yield slurm
    finally:
        harness.stop(slurm)
