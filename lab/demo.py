"""The local lab: nexus-mirror applied to a containerd node on 127.0.0.1, end to end.

Starts the loopback lab (an upstream registry, a pull-through mirror standing
in for Nexus, sshd and one containerd node), applies the program to the node,
and proves with a CRI pull that ``docker.io`` images now come through the
mirror. With the Pulumi CLI installed, ``pulumi up`` runs on a local file
backend; without it, the program runs under Pulumi's mocks and its remote
commands are replayed over SSH exactly as pulumi-command runs them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.e2e import cri
from tests.e2e.lab import IMAGE_REFERENCE, build_image, load_lab, mirror_log, start_lab, stop_lab
from tests.e2e.replay import ReplayMocks, ReplayState
from tests.e2e.stack import lab_config, write_stack_file
from tests.program_run import ROOT, run_program, stack_config

log = logging.getLogger("nexus-mirror.lab")
LAB_DIR = Path(os.environ.get("NEXUS_MIRROR_LAB_DIR", "/tmp/nexus-mirror-lab"))
STACK = "lab"


def _apply_with_cli(stack_file: Path, key: Path) -> None:
    """Run ``pulumi up`` on the lab stack with a file backend inside the lab directory."""
    # NOTE: this path needs the Pulumi CLI and its plugins, which the machines
    # this project is developed on cannot download; it is not run by the tests.
    state = LAB_DIR / "pulumi-state"
    state.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "PULUMI_BACKEND_URL": f"file://{state}",
        "PULUMI_CONFIG_PASSPHRASE": os.environ.get("PULUMI_CONFIG_PASSPHRASE", "nexus-mirror-lab"),
    }
    common = ["--stack", STACK, "--config-file", str(stack_file)]
    subprocess.run(["pulumi", "stack", "select", "--create", STACK], cwd=ROOT, env=env, check=True)
    with key.open() as key_file:
        subprocess.run(
            ["pulumi", "config", "set", "--secret", "nexus-mirror:sshPrivateKey", *common],
            cwd=ROOT,
            env=env,
            stdin=key_file,
            check=True,
        )
    subprocess.run(["pulumi", "up", "--yes", *common], cwd=ROOT, env=env, check=True)
    subprocess.run(["pulumi", "stack", "output", "--json", *common], cwd=ROOT, env=env, check=True)


def _apply_with_replay(stack_file: Path, key: Path) -> dict:
    config, secret_names = stack_config(stack_file, secrets={"sshPrivateKey": key.read_text()})
    mocks = ReplayMocks(ReplayState())
    run = run_program(mocks, config, secret_names, stack=STACK)
    mocks.delete_unregistered()
    return run.outputs


def main() -> int:
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    if (LAB_DIR / "lab.env").exists():
        log.info("stopping the lab left in %s", LAB_DIR)
        stop_lab(LAB_DIR)
    log.info("starting the lab in %s", LAB_DIR)
    lab = start_lab(LAB_DIR, nodes=1)
    build_image(lab)
    config = lab_config(lab, verify={"image": IMAGE_REFERENCE})
    stack_file = write_stack_file(LAB_DIR / f"Pulumi.{STACK}.yaml", config)
    log.info("stack file: %s", stack_file)

    if shutil.which("pulumi"):
        _apply_with_cli(stack_file, lab.ssh_key)
    else:
        log.info(
            "the Pulumi CLI is not installed: running the program under Pulumi's mocks and "
            "replaying its remote commands over SSH, as pulumi-command runs them"
        )
        outputs = _apply_with_replay(stack_file, lab.ssh_key)
        print(json.dumps(outputs["nodes"], indent=2))

    node = load_lab(LAB_DIR).node("node-a")
    log_start = len(mirror_log(lab).splitlines())
    with cri.ImageServiceClient(node.socket) as client:
        image = client.pull_image(IMAGE_REFERENCE)
    new_lines = mirror_log(lab).splitlines()[log_start:]
    served = [line for line in new_lines if "ns=docker.io" in line]
    log.info("CRI pull of %s on node-a: %s", IMAGE_REFERENCE, image)
    log.info("requests of that pull the mirror served for docker.io: %d", len(served))
    log.info("the lab keeps running; stop it with: lab/lab.sh stop %s", LAB_DIR)
    return 0 if served else 1


if __name__ == "__main__":
    sys.exit(main())
