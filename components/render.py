"""``python -m components render``: the files each node would receive, without Pulumi.

For review in pull requests: it validates the stack file exactly as the
program does and writes, per node, the managed files under their absolute
paths and the standard input of both node commands. Encrypted values are
shown as a placeholder.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

import yaml

from .config import parse_config
from .model import MirrorConfig
from .node_script import config_input, hosts_input
from .stack_file import load_stack_file
from .validation import SECRET_PLACEHOLDER, ConfigError

log = logging.getLogger("nexus-mirror")


def render_stack(stack_file: Path, out: Path) -> list[Path]:
    """Validate ``stack_file`` and write every node's files below ``out``; return the paths."""
    values, secret_names = load_stack_file(stack_file)
    config = parse_config(values, secret_names)
    for warning in config.warnings:
        log.warning("%s", warning)
    written: list[Path] = []
    if config.delivery == "kubernetes":
        return _render_kubernetes(config, out)
    for node in config.nodes:
        node_dir = out / node.name
        # Files a node no longer receives must not survive from an earlier render.
        shutil.rmtree(node_dir, ignore_errors=True)
        hosts = hosts_input(node, config)
        for relative, content in hosts.files.items():
            path = node_dir / node.containerd.config_path.lstrip("/") / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content, encoding="utf-8")
            written.append(path)
        for name, text in (
            ("hosts.stdin.sh", hosts.text),
            ("config.stdin.sh", config_input(node, config).text),
        ):
            if name == "config.stdin.sh" and not node.containerd.manage_config_file:
                continue
            path = node_dir / name
            path.write_text(text, encoding="utf-8")
            written.append(path)
    return written


def _render_kubernetes(config: MirrorConfig, out: Path) -> list[Path]:
    """Write every manifest of a Kubernetes stack, one YAML file each, Secret values masked."""
    from .kubernetes.bundle import build_bundle
    from .kubernetes.render import all_manifests

    out = out / "kubernetes"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    written = []
    for index, manifest in enumerate(all_manifests(config, build_bundle(config))):
        if manifest.get("kind") == "Secret":
            for field in ("stringData", "data"):
                if field in manifest:
                    manifest[field] = {name: SECRET_PLACEHOLDER for name in manifest[field]}
        name = manifest.get("metadata", {}).get("name", "object")
        path = out / f"{index:02d}-{manifest.get('kind', 'Object').lower()}-{name}.yaml"
        path.write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m components",
        description="Validate a stack file and write the files each node would receive.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    render = commands.add_parser("render", help="write the files each node would receive")
    render.add_argument("--stack", required=True, help="stack name: reads Pulumi.STACK.yaml")
    render.add_argument(
        "--out",
        required=True,
        type=Path,
        help="directory to write into: OUT/NODE/ per node, OUT/kubernetes/ for manifests; "
        "those subdirectories are replaced",
    )
    render.add_argument(
        "--dir", type=Path, default=Path.cwd(), help="project directory (default: current)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.INFO)

    stack_file = args.dir / f"Pulumi.{args.stack}.yaml"
    if not stack_file.is_file():
        log.error(
            "stack file %s not found or not a file; name an existing stack with --stack", stack_file
        )
        return 2
    try:
        written = render_stack(stack_file, args.out)
    except ConfigError as error:
        log.error("%s", error)
        return 1
    except yaml.YAMLError as error:
        log.error("stack file %s is not valid YAML: %s", stack_file, error)
        return 1
    except ValueError as error:
        # Raised for a file that is not UTF-8, is not a mapping, or has a key without namespace.
        log.error("cannot read stack file %s: %s", stack_file, error)
        return 1
    except OSError as error:
        log.error("cannot write the files to %s: %s", args.out, error)
        return 1
    log.info("wrote %d files for stack %s to %s", len(written), args.stack, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
