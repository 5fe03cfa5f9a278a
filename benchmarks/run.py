"""Measure SSH sessions, restarts and node script time on the loopback lab.

Usage (as root, from the repository): .venv/bin/python -m benchmarks.run [--repeat N]

It starts a two-node lab, applies a stack through the same replay the
end-to-end tests use, and counts from the lab's own logs: SSH sessions from
sshd's "Accepted publickey" lines and restarts from containerd's pid file.
It prints a Markdown report for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.e2e.lab import Lab, build_image, start_lab, stop_lab
from tests.e2e.replay import ReplayMocks, ReplayState
from tests.e2e.stack import lab_config, write_stack_file
from tests.program_run import run_program, stack_config

NODES = ["node-a", "node-b"]


def _sessions(lab: Lab) -> int:
    return (lab.dir / "sshd.log").read_text().count("Accepted publickey")


def _pids(lab: Lab) -> dict[str, str]:
    return {name: lab.node(name).pid_file.read_text().strip() for name in NODES}


def _apply(lab: Lab, state: ReplayState, config: dict, directory: Path) -> float:
    stack_file = write_stack_file(directory / "Pulumi.bench.yaml", config)
    values, secrets = stack_config(stack_file, secrets={"sshPrivateKey": lab.ssh_key.read_text()})
    mocks = ReplayMocks(state)
    started = time.monotonic()
    run_program(mocks, values, secrets, stack="bench")
    mocks.delete_unregistered()
    return time.monotonic() - started


def _reset(lab: Lab) -> None:
    """Put every node back to the config.toml it started with, with no managed files."""
    for name in NODES:
        node = lab.node(name)
        shutil.rmtree(node.certs_dir, ignore_errors=True)
        shutil.rmtree(node.dir / "nexus-mirror-state", ignore_errors=True)
        shutil.copy2(node.dir / "config.toml.pristine", node.config)
        subprocess.run(["sh", "-c", node.restart_command], check=True, capture_output=True)


def _program_scale(node_count: int) -> tuple[float, float]:
    """Run the program under plain mocks for NODE_COUNT nodes; return seconds and peak MiB."""
    code = f"""
import json, resource, time, pulumi
from tests.program_run import ROOT, run_program, stack_config
class Mocks(pulumi.runtime.Mocks):
    def new_resource(self, args):
        return args.name + "-id", dict(args.inputs, stdout="", stderr="")
    def call(self, args):
        return {{}}
nodes = [{{"name": f"n{{i}}", "host": f"10.0.{{i // 250}}.{{i % 250 + 1}}"}} for i in range({node_count})]
config, secrets = stack_config(ROOT / "Pulumi.dev.yaml", {{"nodes": nodes}})
started = time.monotonic()
run_program(Mocks(), config, secrets)
print(json.dumps([time.monotonic() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    seconds, mebibytes = json.loads(result.stdout.strip().splitlines()[-1])
    return seconds, mebibytes


def _node_script_memory(state: ReplayState) -> float:
    """Peak resident MiB of the hosts command's processes, run locally with its real stdin.

    A fresh interpreter runs the script, so its children's peak is the script's alone.
    """
    code = (
        "import resource, subprocess, sys; "
        "subprocess.run(['sh', '-s', '--', 'hosts'], input=sys.stdin.read(), text=True, "
        "capture_output=True, check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)"
    )
    stdin = state.resources["node-a-hosts"]["inputs"]["stdin"]
    result = subprocess.run(
        [sys.executable, "-c", code], input=stdin, capture_output=True, text=True, check=True
    )
    return float(result.stdout.strip())


def measure(repeat: int) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {
        "first: sessions per node": [],
        "first: restarts per node": [],
        "mirror change: sessions per node": [],
        "mirror change: restarts per node": [],
        "same apply: sessions per node": [],
        "config command time (s)": [],
        "hosts command time, first (s)": [],
        "hosts command time, mirror change (s)": [],
        "first apply, 2 nodes, wall (s)": [],
        "node script peak memory, any process (MiB)": [],
        "program run, 200 nodes (s)": [],
        "program peak memory, 200 nodes (MiB)": [],
    }
    with tempfile.TemporaryDirectory(prefix="nm-bench-", dir="/tmp") as scratch:
        directory = Path(scratch)
        lab = start_lab(directory / "lab", nodes=len(NODES))
        try:
            build_image(lab)
            for name in NODES:
                node = lab.node(name)
                (node.dir / "config.toml.pristine").write_bytes(node.config.read_bytes())
            for _ in range(repeat):
                _reset(lab)
                state = ReplayState()
                config = lab_config(lab, NODES, rollout={"maxParallelRestarts": 1})
                sessions, pids = _sessions(lab), _pids(lab)
                wall = _apply(lab, state, config, directory)
                figures["first apply, 2 nodes, wall (s)"].append(wall)
                figures["first: sessions per node"].append((_sessions(lab) - sessions) / len(NODES))
                restarted = sum(pids[n] != p for n, p in _pids(lab).items())
                figures["first: restarts per node"].append(restarted / len(NODES))
                for execution in state.executions:
                    duration = execution.finished - execution.started
                    key = (
                        "config command time (s)"
                        if execution.resource.endswith("-config")
                        else "hosts command time, first (s)"
                    )
                    figures[key].append(duration)

                sessions = _sessions(lab)
                _apply(lab, state, config, directory)
                figures["same apply: sessions per node"].append(
                    (_sessions(lab) - sessions) / len(NODES)
                )

                changed = lab_config(
                    lab,
                    NODES,
                    rollout={"maxParallelRestarts": 1},
                    registries={
                        "docker.io": {
                            "nexus": {"port": lab.mirror_port},
                            "mirrors": [{"url": f"http://127.0.0.1:{lab.upstream_port}"}],
                        }
                    },
                )
                sessions, pids = _sessions(lab), _pids(lab)
                before = len(state.executions)
                _apply(lab, state, changed, directory)
                figures["mirror change: sessions per node"].append(
                    (_sessions(lab) - sessions) / len(NODES)
                )
                restarted = sum(pids[n] != p for n, p in _pids(lab).items())
                figures["mirror change: restarts per node"].append(restarted / len(NODES))
                for execution in state.executions[before:]:
                    figures["hosts command time, mirror change (s)"].append(
                        execution.finished - execution.started
                    )
                figures["node script peak memory, any process (MiB)"].append(
                    _node_script_memory(state)
                )
        finally:
            stop_lab(directory / "lab")
    for _ in range(repeat):
        seconds, mebibytes = _program_scale(200)
        figures["program run, 200 nodes (s)"].append(seconds)
        figures["program peak memory, 200 nodes (MiB)"].append(mebibytes)
    return figures


def report(figures: dict[str, list[float]], repeat: int) -> str:
    lines = [
        f"Measured with `python -m benchmarks.run --repeat {repeat}`: {os.cpu_count()} cores, "
        f"{platform.machine()}, Python {platform.python_version()}, "
        f"containerd {subprocess.run(['containerd', '--version'], capture_output=True, text=True).stdout.split()[2]}.",
        "",
        "| figure | median | min | max | samples |",
        "|---|---|---|---|---|",
    ]
    for name, values in figures.items():
        if values:
            lines.append(
                f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} | {len(values)} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="applies of each kind to measure")
    args = parser.parse_args()
    print(report(measure(args.repeat), args.repeat))


if __name__ == "__main__":
    main()
