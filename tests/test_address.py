"""cluster.interface: each node picks its own address by interface name or CIDR (issue 24)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mmhpc.launch.address import AddressError, interfaces, node_address
from mmhpc.launch.env import JobEnv

ROOT = Path(__file__).resolve().parents[1]


def test_by_name_by_cidr_and_errors():
    assert interfaces()["lo"] == "127.0.0.1"
    assert (node_address("lo").addr, node_address("lo").interface) == ("127.0.0.1", "lo")
    assert node_address("ib0,hsn0,lo").interface == "lo"          # the first one present
    assert node_address("127.0.0.0/8").addr == "127.0.0.1"
    assert node_address("", single_node=True).addr == "127.0.0.1"
    with pytest.raises(AddressError, match=r"no address for cluster.interface=ib9 .*lo=127.0.0.1"):
        node_address("ib9")
    with pytest.raises(AddressError, match="no address for cluster.interface=203.0.113.0/24"):
        node_address("203.0.113.0/24")
    with pytest.raises(AddressError, match="neither an interface name nor a CIDR"):
        node_address("10.0.0.0/99")


def test_job_env_takes_the_interface_even_on_one_node():
    j = JobEnv.from_environ({}, hostname="n0", interface="lo")
    assert (j.host_addr, j.host_via) == ("127.0.0.1", "lo, cluster.interface=lo")
    assert JobEnv.from_environ({}, hostname="n0", host_addr="10.0.0.5").host_via == \
        "cluster.host_addr"


def test_dry_run_prints_this_nodes_choice_and_a_bad_interface_fails_at_start():
    out = subprocess.run([sys.executable, "-m", "mmhpc", "cluster.interface=127.0.0.0/8",
                          "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1].endswith(
        ": 127.0.0.1 on lo (cluster.interface=127.0.0.0/8)"), out.stdout
    bad = subprocess.run([str(Path(sys.executable).parent / "mpiexec"), "-n", "2",
                          sys.executable, "-m", "mmhpc", "deployment=ep_d",
                          "deployment.frontend_shares_rank=true", "cluster.interface=ib9"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert bad.stderr.count("mmhpc: error: no address for cluster.interface=ib9") == 1, bad.stderr
