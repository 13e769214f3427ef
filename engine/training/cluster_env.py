"""Where a rank learns its place in the job: the launcher's environment, made uniform.

`deepspeed` and `torchrun` export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
SLURM's `srun` exports none of them, only SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and the job's
compressed node list; without a translation every task of `srun python engine/train.py` would
believe it is rank 0 of 1 and train alone. `process_group_env` returns the variables to set.
"""
from __future__ import annotations

import re

_BRACKETS = re.compile(r"\[([^\]]*)\]")


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list such as 'gpu[003-005,010],cpu7' (-> 'gpu003').

    SLURM lists ranges in order, so the first host takes the first value of every bracket group
    of the first top-level item; zero padding is part of the value and is kept.
    """
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    item = nodelist[:end].strip()
    if not item or depth < 0:
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: cannot read a host name from it")
    return _BRACKETS.sub(lambda m: m.group(1).split(",")[0].split("-")[0], item)


def process_group_env(env: dict[str, str]) -> dict[str, str]:
    """Variables to export before joining the process group (empty when the launcher set them).

    - RANK already set (deepspeed, torchrun, mpirun wrappers): nothing to add.
    - Under srun with SLURM_NTASKS > 1: rank, world size and local rank from SLURM; the master is
      the first host of the job; the port is MASTER_PORT if given, else derived from the job id so
      that every task picks the same one without talking to the others.
    - Otherwise (plain `python engine/train.py`): a one-rank group on this host; the port is
      chosen by the caller.
    """
    if "RANK" in env:
        return {}
    tasks = int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1)
    if "SLURM_PROCID" in env and tasks > 1:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise ValueError("SLURM_PROCID is set but SLURM_JOB_NODELIST is not: cannot find the master host")
        job = int(env.get("SLURM_JOB_ID", "0") or 0)
        return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": str(tasks), "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
                "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodelist),
                "MASTER_PORT": env.get("MASTER_PORT") or str(15000 + job % 20000)}
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
