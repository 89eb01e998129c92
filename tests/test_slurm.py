"""Scale-out for real: a one-node SLURM cluster on this machine (Debian's slurm-wlm and munge, started
here as root the way a site's sysadmin would), the jobs behind the smoke DAG's first oracle search
submitted to it through workflow/profiles/slurm and snakemake-executor-plugin-slurm (every kind of job
up to a fanned-out search and its gather), and the same results as the local run.

The config is /etc/slurm/slurm.conf, where every SLURM command looks (SLURM_CONF would not do: the
plugin's job step drops SLURM_* variables before its `srun`); one already there is put back at the end.
Everything else lives in a temporary folder: the munge key and socket, state, spool and logs; the ports
are free ones on 127.0.0.1. The daemons run in the foreground as children of this process and are
stopped at the end, whatever happened."""
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from spot.workflow.stage_table import STAGE
from tests.conftest import copy_repo, env, running

DAEMONS = ["munged", "slurmctld", "slurmd"]
CLIENTS = ["sbatch", "squeue", "sinfo", "scontrol", "scancel", "srun", "sacct"]
SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])   # where Debian puts the daemons
MISSING = [b for b in DAEMONS + CLIENTS if shutil.which(b, path=SBIN) is None]
# checked before any fixture runs (the local smoke run takes minutes)
pytestmark = [pytest.mark.end_to_end,
              pytest.mark.skipif(os.geteuid() != 0, reason="starting SLURM's daemons needs root (as a cluster's "
                                                           "sysadmin would)"),
              pytest.mark.skipif(bool(MISSING), reason=f"SLURM and munge are not installed (missing "
                                                       f"{', '.join(MISSING)}): apt-get install slurm-wlm munge")]
CPUS, MEMORY_MB = 2, 4000           # the node, whatever the machine
PARTITION, ACCOUNT = "test", "spot"
CONF = Path("/etc/slurm/slurm.conf")    # Debian's slurm-wlm reads it there
TIMEOUT_S = 1800                        # 8 jobs, about 3 min with 2 CPUs
TARGET = "out/oracle/spot-a/4/run.json"  # shard, saliency, decode, backbone, evaluate, 2 oracle parts, gather
COMPARED = ["out/eval/spot-a", "out/oracle/spot-a"]


def tail(text: str | bytes | None, n: int = 4000) -> str:
    text = text.decode(errors="replace") if isinstance(text, bytes) else text or ""
    return text[-n:]


def failed_job_logs(cwd: Path) -> str:
    """The last lines of the SLURM logs of failed jobs (.snakemake/slurm_logs/rule_<rule>/.../<jobid>.log)."""
    logs = sorted((cwd / ".snakemake" / "slurm_logs").rglob("*.log"))
    return "\n".join(f"--- {p.relative_to(cwd)}\n{tail(p.read_text(), 1500)}" for p in logs if "Error" in p.read_text())


def minutes(limit: str) -> int:
    """squeue's time limit ([D-]HH:MM:SS or MM:SS) in minutes."""
    days, _, clock = limit.rpartition("-")
    h, m, _ = ([0, 0] + [int(x) for x in clock.split(":")])[-3:]
    return int(days or 0) * 1440 + h * 60 + m


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


CONF_TEXT = """\
# Written by tests/test_slurm.py for its one-node test cluster (and removed after it).
# One node, this host, on 127.0.0.1: no cgroups, no accounting database.
ClusterName=spottest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={dir}/munge/munge.socket
CredType=cred/munge
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/log/slurmctld.log
SlurmdLogFile={dir}/log/slurmd.log
SlurmdDebug=info
SlurmctldDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
ReturnToService=2
# Finished jobs stay in slurmctld's memory (and squeue --states=all) this long.
MinJobAge=3600
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName={partition} Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    """munged, slurmctld and slurmd in the foreground, configured under `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {k: v for k, v in env(PATH=SBIN).items()
                    if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SQUEUE_"))}
        self.backup = root / "slurm.conf.before"
        self.wrote_conf = False

    def start(self):
        r = self.root
        for d in ("munge", "state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        ctld_port, slurmd_port = free_ports(2)
        if CONF.exists():
            shutil.copy2(CONF, self.backup)
        CONF.parent.mkdir(parents=True, exist_ok=True)
        self.wrote_conf = True
        CONF.write_text(CONF_TEXT.format(host=self.host, ctld_port=ctld_port, slurmd_port=slurmd_port, dir=r,
                                               cpus=CPUS, memory=MEMORY_MB, partition=PARTITION))
        self._spawn("munged", ["munged", "--foreground", "--force", f"--key-file={key}",
                               f"--socket={r / 'munge' / 'munge.socket'}", f"--pid-file={r / 'munge' / 'munged.pid'}",
                               f"--log-file={r / 'log' / 'munged.log'}", f"--seed-file={r / 'munge' / 'munged.seed'}"])
        self._wait(lambda: (r / "munge" / "munge.socket").exists(), "munged's socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        self._wait(lambda: self.run("scontrol", "ping").returncode == 0, "slurmctld to answer scontrol ping")
        self._spawn("slurmd", ["slurmd", "-D", "-N", self.host])
        self._wait(lambda: self.run("sinfo", "-h", "-o", "%T").stdout.strip() == "idle", "the node to be idle")

    def run(self, *cmd) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)

    def _spawn(self, name, cmd):
        log = open(self.root / "log" / f"{name}.out", "w")
        # in this process group: whatever kills the test run (Ctrl-C, a CI timeout) kills them too
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def _wait(self, ready, what, timeout=60):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for name, p in self.procs.items():
                assert p.poll() is None, f"{name} exited ({p.returncode}):\n{self.logs()}"
            if ready():
                return
            time.sleep(0.5)
        raise AssertionError(f"waited {timeout} s for {what}:\n{self.logs()}")

    def logs(self) -> str:
        """The last lines of each daemon's log."""
        return "\n".join(f"--- {p.name}\n{tail(p.read_text(), 2000)}" for p in sorted((self.root / "log").glob("*")))

    def stop(self):
        """Cancel every job, wait for the queue to drain, stop the daemons (slurmd, slurmctld, munged)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--user", "root")
            end = time.monotonic() + 30
            while time.monotonic() < end and self.run("squeue", "-h", "-t", "PD,R,CG").stdout.strip():
                time.sleep(0.5)
        for name in reversed(list(self.procs)):
            p = self.procs[name]
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if self.wrote_conf:
            if self.backup.exists():
                shutil.copy2(self.backup, CONF)
            else:
                CONF.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    # /tmp/pytest-of-root/... is short enough for munge's unix socket path
    with running(Cluster(tmp_path_factory.mktemp("slurm"))) as cluster:
        yield cluster


def site_profile(profile: dict) -> dict:
    """workflow/profiles/slurm/config.yaml as the user of this cluster edits it: its account and partition,
    no job larger than its node, one CPU a job (two jobs at a time, as the local run's --cores 2; a job's
    threads stay those of the local run), and squeue for the job states (no accounting database)."""
    def fit(resources: dict) -> dict:
        caps = {"mem_mb": MEMORY_MB // CPUS, "cpus_per_task": 1}
        return {k: min(v, caps[k]) if k in caps else v for k, v in resources.items()}

    return profile | {
        "default-resources": fit(profile["default-resources"]) | {"slurm_account": ACCOUNT, "slurm_partition": PARTITION,
                                                                  "cpus_per_task": 1},
        "set-resources": {rule: fit(r) for rule, r in profile["set-resources"].items()},
        "max-threads": CPUS,
        "set-threads": {rule: min(STAGE[rule].threads, CPUS) for rule in profile["set-threads"]},   # the local run's
        "slurm-status-command": "squeue",
        "slurm-init-seconds-before-status-checks": 5,      # a test: look early and often
        "slurm-keep-successful-logs": True,                # for the assertion messages
    }


def planned(cwd: Path) -> Counter:
    """The jobs `snakemake -n` plans for TARGET, by rule (its "Job stats" table)."""
    r = subprocess.run(["snakemake", "-n", "--config", "params=config/smoke.yaml", "--", TARGET],
                       cwd=cwd, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, tail(r.stdout + r.stderr)
    table = r.stdout.split("Job stats:")[1].split("total")[0]
    return Counter({rule: int(n) for rule, n in re.findall(r"^(\w+)\s+(\d+)$", table, flags=re.M)})


def test_smoke_jobs_through_the_slurm_profile_give_the_local_results(smoke_run, slurm_cluster, tmp_path):
    assert importlib.util.find_spec("snakemake_executor_plugin_slurm"), "pip install -e '.[slurm]'"
    local, _ = smoke_run
    cwd = copy_repo(tmp_path)
    profile = cwd / "workflow" / "profiles" / "slurm" / "config.yaml"
    site = site_profile(yaml.safe_load(profile.read_text()))
    profile.write_text(yaml.safe_dump(site, sort_keys=False))
    plan = planned(cwd)
    assert {"backbone", "oracle", "oracle_gather"} <= set(plan) and plan["oracle"] > 1, plan
    start = time.monotonic()
    try:
        r = subprocess.run(["snakemake", "--profile", "workflow/profiles/slurm", "--config", "params=config/smoke.yaml",
                            "--", TARGET], cwd=cwd, env=slurm_cluster.env, capture_output=True, text=True,
                           timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"snakemake under SLURM ran past {TIMEOUT_S} s:\n{tail(e.stderr)}\n"
                             f"{slurm_cluster.run('squeue', '-h', '-t', 'all').stdout}") from None
    took = time.monotonic() - start
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{tail(out)}\n{failed_job_logs(cwd)}\n{slurm_cluster.logs()}"

    # every planned job ran here, each as one sbatch job that SLURM ran to completion with the profile's
    # account, partition and runtime
    ran = Counter(re.findall(r"\(Rule: (\w+)\)", out))
    assert ran == plan, (ran, plan)
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", out)
    assert len(submitted) == ran.total(), (ran, submitted)
    jobs = {}
    for line in slurm_cluster.run("squeue", "-h", "-t", "all", "-o", "%i|%T|%k|%a|%P|%l").stdout.splitlines():
        jobid, *fields = line.split("|")
        jobs[jobid] = fields
    sbatched = Counter()
    for j in submitted:
        state, comment, account, partition, limit = jobs[j]
        rule = comment.removeprefix("rule_").split("_wildcards_")[0]            # the plugin's --comment
        sbatched[rule] += 1
        runtime = site["set-resources"].get(rule, {}).get("runtime", site["default-resources"]["runtime"])
        assert (state, account, partition, minutes(limit)) == ("COMPLETED", ACCOUNT, PARTITION, runtime), (j, rule)
    assert sbatched == ran, sbatched

    # the evaluation and the oracle search give the local run's bytes (run.json names times and hosts)
    for folder in COMPARED:
        files = sorted(p.relative_to(local) for p in (local / folder).rglob("*") if p.is_file() and p.name != "run.json")
        assert files, folder
        for f in files:
            assert (cwd / f).read_bytes() == (local / f).read_bytes(), f
    print(f"{len(submitted)} SLURM jobs in {took:.0f} s")
