"""scripts/slurm.sbatch under a real SLURM: saved at the time-limit warning, requeued, resumed, COMPLETED.

scripts/slurm_check.sh starts a one-host cluster (munged, MariaDB and slurmdbd, slurmctld, slurmd on
127.0.0.1), submits a device=cpu render's sbatch with a three-minute limit and checks the job's states
in scontrol and sacct and its log; it takes ten to fifteen minutes. Run with ``pytest -m slurm`` as
root (it installs slurm-wlm, slurmdbd, munge and mariadb-server when missing).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CHECK = Path(__file__).resolve().parents[1] / "scripts" / "slurm_check.sh"


@pytest.mark.slurm
@pytest.mark.skipif(os.geteuid() != 0, reason="starts SLURM daemons as root")
def test_sbatch_saves_at_the_time_limit_requeues_resumes_and_completes():
    env = os.environ | {"PYTHON": sys.executable}
    result = subprocess.run(["bash", str(CHECK)], env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "PASS:" in result.stdout
