"""scripts/slurm.sbatch under a real SLURM: saved at the time-limit warning, requeued, resumed, COMPLETED.

scripts/slurm_check.sh starts a one-host cluster (munged, MariaDB and slurmdbd, slurmctld, slurmd on
127.0.0.1), submits a device=cpu render's sbatch with a three-minute limit and checks the job's states
in scontrol and sacct and its log; it takes ten to fifteen minutes on an idle 2-core host, three times
that on a busy one. Run with ``pytest -m slurm`` as root (it installs slurm-wlm, slurmdbd, munge and
mariadb-server when missing). However it ends, the check stops every process it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timing

CHECK = Path(__file__).resolve().parents[1] / "scripts" / "slurm_check.sh"
# The check's own bounds (CHECK_TIMEOUT, 3 h of wall time for the job) and ten minutes to set up and
# stop: past them the test ends the check with SIGTERM, on which it stops what it started.
LIMIT_S = 3 * 3600 + 600


@pytest.mark.slurm
@pytest.mark.skipif(os.geteuid() != 0, reason="starts SLURM daemons as root")
def test_sbatch_saves_at_the_time_limit_requeues_resumes_and_completes(tmp_path):
    env = os.environ | {"PYTHON": sys.executable}
    log = tmp_path / "check.log"
    with log.open("w") as out:
        check = subprocess.Popen(
            ["bash", str(CHECK)], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        timing.wait(check, LIMIT_S)
    except subprocess.TimeoutExpired:
        check.terminate()
        try:
            timing.wait(check, 300)
        except subprocess.TimeoutExpired:
            os.killpg(check.pid, signal.SIGKILL)
        pytest.fail(f"the check ran past {LIMIT_S} s: {log.read_text()[-6000:]}")
    output = log.read_text()
    assert check.returncode == 0, output[-9000:]
    assert "PASS:" in output
