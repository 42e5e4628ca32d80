"""Deploy the federation on loopback: one SuperLink, N SuperNodes, then `flwr run`.

What :func:`deploy_local` runs (ports are free ports picked at start-up; all
addresses are 127.0.0.1; ``FLWR_HOME`` points to a temporary folder so the
user's ``~/.flwr`` is never read or written)::

    flower-superlink --insecure --disable-runtime-dependency-installation --host 127.0.0.1 --port $LINK
    flower-supernode --insecure --superlink 127.0.0.1:$LINK \\
        --host 127.0.0.1 --port $CLIENTAPP_RUNTIME_i \\
        --node-config "partition-id=i num-partitions=N"            # one per client
    # $FLWR_HOME/config.toml:
    #   [superlink]
    #   default = "loopback"
    #   [superlink.loopback]
    #   address = "127.0.0.1:$LINK"
    #   insecure = true
    flwr run privacy/federated loopback --stream --run-config "num-clients=N run-dir='...'"

Flower 1.42 serves the SuperLink's Fleet, Control and ServerApp-runtime APIs
over HTTP on ONE address, ``--host/--port`` (the older gRPC flags
``--fleet-api-address`` / ``--control-api-address`` are deprecated and ignored;
the facts sheet's 9091/9092/9093 ports are from before). The SuperNode's
``--superlink`` and the ``flwr`` connection address both point at it; the
SuperNode's own ``--host/--port`` is its ClientApp runtime API (formerly
``--clientappio-api-address``). Federations are no longer in pyproject.toml but
in ``$FLWR_HOME/config.toml`` (``[superlink.<name>]``).

The ServerApp and ClientApps import ``privacy.federated.*`` from the repository:
every process gets ``PYTHONPATH=<repo root>`` (on real machines: install the repo
on each node). Each SuperNode's ClientApp gets its own data partition from
``--node-config``; its data never leaves its process.

TLS and node authentication (not used on loopback; for a real deployment)
-------------------------------------------------------------------------
* SuperLink with TLS: drop ``--insecure``, add
  ``--ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key``.
* SuperNode with TLS: drop ``--insecure``, add ``--root-certificates ca.crt``
  (the CA that signed the SuperLink's certificate).
* ``flwr run`` with TLS: in the ``[superlink.<name>]`` section set
  ``root-certificates = "ca.crt"`` instead of ``insecure = true``.
* Node authentication: by default SuperNodes prove their identity with signed
  timestamps (automatic keys); to admit only known nodes start the SuperLink
  with ``--enable-supernode-auth`` (requires TLS), register each node's public
  key with ``flwr supernode register <public-key> <superlink>``, and start each
  SuperNode with ``--auth-supernode-private-key key`` /
  ``--auth-supernode-public-key key.pub``.
* Runtime dependency installation (``uv sync`` of the app's declared
  dependencies into a per-run environment) is switched off on the SuperLink
  (``--disable-runtime-dependency-installation``; SuperNodes have it off unless
  ``--allow-runtime-dependency-installation``): this app declares none and runs
  in the repository's own environment, and nothing may be downloaded at run time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

APP_DIR = Path(__file__).resolve().parent
REPO_ROOT = APP_DIR.parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return "'" + value.replace("'", "") + "'"
    return repr(value)


def _wait_for_port(port: int, deadline: float, process: subprocess.Popen, name: str) -> None:
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with code {process.returncode} before listening on 127.0.0.1:{port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"{name} did not listen on 127.0.0.1:{port} in time")


def _stop(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group we started, then SIGKILL it if it does not go."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=grace)


def deploy_local(
    num_supernodes: int = 2,
    run_config: Optional[Mapping[str, Any]] = None,
    work_dir: Optional[str | os.PathLike] = None,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Start SuperLink + SuperNodes on loopback, `flwr run` the app, wait, tear down. Returns the run summary."""
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="flwr-deploy-"))
    work.mkdir(parents=True, exist_ok=True)
    flwr_home = work / "flwr_home"
    flwr_home.mkdir(exist_ok=True)
    run_dir = work / "run"
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]),
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    link_port = free_port()  # Flower 1.42: Fleet, Control and ServerApp runtime APIs share one HTTP port
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    overrides = {**(run_config or {}), "num-clients": num_supernodes, "run-dir": str(run_dir)}
    deadline = time.time() + timeout
    processes: list[tuple[str, subprocess.Popen]] = []
    logs: dict[str, Path] = {}

    def start(name: str, command: list[str]) -> subprocess.Popen:
        logs[name] = work / f"{name}.log"
        handle = open(logs[name], "wb")
        process = subprocess.Popen(command, cwd=work, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        processes.append((name, process))
        return process

    t0 = time.time()
    returncode = -1
    try:
        link = start("superlink", [str(bin_dir / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(link_port)])
        _wait_for_port(link_port, min(deadline, time.time() + 90), link, "flower-superlink")
        for i in range(num_supernodes):
            start(
                f"supernode{i}",
                [str(bin_dir / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}", "--host", "127.0.0.1",
                 "--port", str(free_port()), "--node-config", f"partition-id={i} num-partitions={num_supernodes}"],
            )
        # the FAB is built from a copy of the app folder without caches
        app_copy = work / "app"
        shutil.copytree(APP_DIR, app_copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
        run_config_arg = " ".join(f"{k}={_toml_value(v)}" for k, v in overrides.items())
        run = start("flwr-run", [str(bin_dir / "flwr"), "run", str(app_copy), "loopback", "--stream", "--run-config", run_config_arg])
        # `flwr run --stream` returns when the run has finished; the ServerApp writes the round log at the end
        rounds_file = run_dir / "federated_rounds.json"
        finished = False
        while time.time() < deadline:
            if (run_dir / "global_model.npz").exists() and rounds_file.exists():
                finished = True
                break
            if run.poll() is not None and run.returncode != 0:
                break
            time.sleep(1.0)
        if finished:
            try:
                run.wait(timeout=max(5.0, min(30.0, deadline - time.time())))
            except subprocess.TimeoutExpired:
                pass
            returncode = 0
        else:
            returncode = run.returncode if run.poll() is not None else -9
    finally:
        for name, process in reversed(processes):
            _stop(process)
    tail = "\n".join(f"--- {name}\n" + logs[name].read_text(errors="replace")[-3000:] for name in logs)
    summary: dict[str, Any] = {}
    if (run_dir / "federated_rounds.json").exists():
        summary = json.loads((run_dir / "federated_rounds.json").read_text())
        with np.load(run_dir / "global_model.npz") as data:
            summary["final_state"] = {k: data[k] for k in data.files}
    return {"returncode": returncode, "seconds": time.time() - t0, "summary": summary, "log_tail": tail, "work_dir": str(work)}


if __name__ == "__main__":
    result = deploy_local(num_supernodes=int(sys.argv[1]) if len(sys.argv) > 1 else 2, run_config={"num-rounds": 1})
    print(json.dumps({k: v for k, v in result.items() if k not in ("summary", "log_tail")}, indent=2))
    print(result["log_tail"][-4000:] if result["returncode"] else f"completed {result['summary'].get('rounds_completed')} round(s)")
    sys.exit(0 if result["returncode"] == 0 else 1)
