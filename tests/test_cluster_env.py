"""Launcher environments: SLURM node lists, srun's variables mapped to a process group, and two
processes started the way srun starts them forming one two-rank training job."""
import pytest

from engine.training.cluster_env import first_host, process_group_env


@pytest.mark.parametrize("nodelist, host", [
    ("node17", "node17"),
    ("gpu[003-005,010],cpu7", "gpu003"),
    ("gpu[010,003-005]", "gpu010"),                 # SLURM keeps the order it was given
    ("cpu7,gpu[003-005]", "cpu7"),
    ("rack[2-3]-n[08-09]", "rack2-n08"),
    ("a-b.c[1]", "a-b.c1"),
])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_bad_nodelist_is_one_line_error():
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        first_host(",node1")


def test_process_group_env():
    assert process_group_env({"RANK": "3", "SLURM_PROCID": "1", "SLURM_NTASKS": "4"}) == {}   # launcher wins
    srun = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
            "SLURM_JOB_NODELIST": "gpu[12-15]", "SLURM_JOB_ID": "123456"}
    assert process_group_env(srun) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu12",
                                       "MASTER_PORT": str(15000 + 123456 % 20000)}
    assert process_group_env({**srun, "MASTER_PORT": "29500"})["MASTER_PORT"] == "29500"
    # A one-task allocation (or no SLURM at all) is a one-rank group.
    single = process_group_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert single["RANK"] == "0" and single["WORLD_SIZE"] == "1"
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        process_group_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
