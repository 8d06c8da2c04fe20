"""Config composition, CLI errors, and JobEnv from launcher environments."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mmhpc.config import Config
from mmhpc.launch.env import JobEnv, parse_tasks_per_node
from mmhpc.launch.hydra import ConfigError, compose_config

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmhpc", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_defaults_compose_to_dataclasses():
    c = compose_config([])
    assert isinstance(c, Config) and c.model.path == "models/mmhpc-toy"
    assert c.deployment.name == "agg" and c.deployment.num_ranks == 1 and c.cluster.name == "local"


@pytest.mark.parametrize("group, names", [
    ("model", ["toy", "tiny_llava", "tiny_qwen2_vl", "example_real", "llava_1_5_7b",
               "qwen2_vl_7b"]),
    ("deployment", ["agg", "ep_d", "e_p_d"]),
    ("cluster", ["local", "h200", "gb200"]),
])
def test_every_config_file_composes(group, names):
    for n in names:
        c = compose_config([f"{group}={n}"])
        assert getattr(c, group).name in (n, None) or group == "model"


def test_deployment_sizes():
    assert compose_config(["deployment=e_p_d"]).deployment.num_ranks == 4
    assert compose_config(["deployment=ep_d"]).deployment.num_ranks == 3
    c = compose_config(["cluster=h200", "cluster.nodes=4"])
    assert c.cluster.world_size == 32


@pytest.mark.parametrize("override, needle", [
    ("model.foo=1", "Key 'foo' not in 'ModelConfig'"),
    ("model.max_model_len=abc", "could not be converted to Integer"),
    ("model.dtype=int3", "model.dtype must be"),
    ("deployment=nope", "options: agg, e_p_d, ep_d"),
    ("deployment.encode.instances=1", "deployment agg does not use encode"),
    ("cluster.nodes=0", "cluster.nodes must be >= 1"),
    ("timeouts.kv_transfer_s=0", "timeouts.kv_transfer_s must be > 0"),
])
def test_bad_overrides_are_one_line(override, needle):
    with pytest.raises(ConfigError) as e:
        compose_config([override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_cli_cfg_job_and_errors():
    out = cli("deployment=e_p_d", "--cfg", "job")
    assert out.returncode == 0 and "name: e_p_d" in out.stdout and "cluster:" in out.stdout
    bad = cli("model.foo=1")
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("mmhpc: error: Could not override 'model.foo'")
    assert cli("--world-size", "x", "--dry-run").returncode == 2


# ---- JobEnv ------------------------------------------------------------------------------

def test_singleton():
    j = JobEnv.from_environ({}, hostname="laptop")
    assert (j.rank, j.world_size, j.local_rank, j.ranks_per_node, j.num_nodes) == (0, 1, 0, 1, 1)
    assert j.launcher == "singleton" and j.host_addr == "127.0.0.1"


def test_srun_two_nodes():
    env = {"SLURM_PROCID": "13", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
           "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_TASKS_PER_NODE": "8(x2)",
           "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_STEP_GPUS": "0,1,2,3,4,5,6,7",
           "PMI_RANK": "13", "PMI_SIZE": "16"}   # srun --mpi=pmi2 sets both
    j = JobEnv.from_environ(env, hostname="gpu02", host_addr="10.1.0.2")
    assert (j.rank, j.world_size, j.local_rank, j.ranks_per_node) == (13, 16, 5, 8)
    assert (j.num_nodes, j.node_index, j.host_addr) == (2, 1, "10.1.0.2")
    assert j.device_index(8) == 5 and j.device_index(0) == -1


def test_srun_one_gpu_per_task():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "3", "SLURM_NNODES": "1",
           "SLURM_NODEID": "0", "SLURM_TASKS_PER_NODE": "4", "CUDA_VISIBLE_DEVICES": "3"}
    j = JobEnv.from_environ(env, hostname="n")
    assert j.device_index(4) == 0 and j.host_addr == "127.0.0.1"


def test_srun_sixteen_nodes():
    env = {"SLURM_PROCID": "127", "SLURM_NTASKS": "128", "SLURM_LOCALID": "7",
           "SLURM_NNODES": "16", "SLURM_NODEID": "15", "SLURM_TASKS_PER_NODE": "8(x16)",
           "PMIX_RANK": "127"}
    j = JobEnv.from_environ(env, hostname="n", host_addr="10.0.0.16")
    assert (j.rank, j.world_size, j.ranks_per_node, j.num_nodes, j.node_index) == \
        (127, 128, 8, 16, 15)
    assert j.launcher == "pmix"


def test_openmpi_mpirun_inside_sbatch_ignores_stale_slurm():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
           "OMPI_COMM_WORLD_RANK": "6", "OMPI_COMM_WORLD_SIZE": "8",
           "OMPI_COMM_WORLD_LOCAL_RANK": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
    j = JobEnv.from_environ(env, hostname="n", host_addr="10.0.0.2")
    assert (j.rank, j.world_size, j.local_rank, j.ranks_per_node) == (6, 8, 2, 4)
    assert (j.num_nodes, j.node_index, j.launcher) == (2, 1, "openmpi")


def test_mpich_hydra():
    env = {"PMI_RANK": "2", "PMI_SIZE": "3", "MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "3"}
    j = JobEnv.from_environ(env, hostname="n")
    assert (j.rank, j.world_size, j.local_rank, j.ranks_per_node, j.num_nodes) == (2, 3, 2, 3, 1)
    assert j.launcher == "mpich"


def test_tasks_per_node_parse():
    assert parse_tasks_per_node("4(x2),3") == [4, 4, 3]
    with pytest.raises(ValueError):
        parse_tasks_per_node("four")
