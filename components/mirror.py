"""The NexusMirror component: one stack's mirrors put on every node over SSH."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pulumi
from pulumi_command import remote

from .credentials import config_auth_tables
from .hosts_toml import render_hosts_toml
from .model import MirrorConfig, Node
from .node_script import config_input, hosts_input, node_command
from .report import node_output

TYPE_TOKEN = "nexus-mirror:index:NexusMirror"


def command_name(node: Node, step: str) -> str:
    return f"{node.name}-{step}"


def restart_batches(nodes: Sequence[Node], size: int) -> list[list[Node]]:
    """Split the nodes whose config.toml is managed into groups that may restart together."""
    managed = [node for node in nodes if node.containerd.manage_config_file]
    return [managed[start : start + size] for start in range(0, len(managed), size)]


def _report_merger(
    config: MirrorConfig, node: Node, resource: pulumi.Resource
) -> Callable[[list[Any]], dict[str, Any]]:
    def merge(reports: list[Any]) -> dict[str, Any]:
        output = node_output(config, node, reports[0], reports[1])
        for warning in output["warnings"]:
            pulumi.log.warn(f"node {node.name}: {warning}", resource=resource)
        return output

    return merge


class NexusMirror(pulumi.ComponentResource):
    """Containerd registry mirrors on every node, proven by each node's report.

    Per node there are two commands. ``<node>-config`` points config.toml's
    config_path at the hosts directory and restarts containerd only when the
    file changed; these run in batches of ``rollout.maxParallelRestarts``, each
    batch after the previous one. ``<node>-hosts`` writes the hosts.toml files
    once the node's config command is done; a mirror-only change reruns only
    this command, one SSH session per node.
    """

    hosts_toml: pulumi.Output[dict[str, str]]
    """Rendered hosts.toml by registry namespace."""
    nodes: pulumi.Output[dict[str, Any]]
    """Per node: containerd version, config_path, restart, files, mirror status, test pull."""
    commands: dict[str, remote.Command]
    """The child commands by resource name, such as ``worker-1-hosts``."""

    def __init__(
        self,
        name: str,
        config: MirrorConfig,
        private_key: pulumi.Input[str] | None = None,
        private_key_password: pulumi.Input[str] | None = None,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__(TYPE_TOKEN, name, None, opts)
        self.commands = {}
        for warning in config.warnings:
            pulumi.log.warn(warning, resource=self)

        config_commands: dict[str, remote.Command] = {}
        previous_batch: list[remote.Command] = []
        config_auth = bool(config_auth_tables(config.namespaces))
        for batch in restart_batches(config.nodes, config.max_parallel_restarts):
            current = []
            for node in batch:
                node_input = config_input(node, config)
                config_stdin: pulumi.Input[str] = (
                    pulumi.Output.secret(node_input.text) if node_input.secret else node_input.text
                )
                command = remote.Command(
                    command_name(node, "config"),
                    connection=self._connection(node, config, private_key, private_key_password),
                    create=node_command(node, "config"),
                    # Credentials written to config.toml are removed again on destroy.
                    delete=node_command(node, "config-delete") if config_auth else None,
                    stdin=config_stdin,
                    logging=remote.Logging.STDERR,
                    opts=pulumi.ResourceOptions(parent=self, depends_on=list(previous_batch)),
                )
                config_commands[node.name] = command
                self.commands[command_name(node, "config")] = command
                current.append(command)
            previous_batch = current

        node_outputs: dict[str, pulumi.Output[Any]] = {}
        for node in config.nodes:
            node_input = hosts_input(node, config)
            stdin: pulumi.Input[str] = (
                pulumi.Output.secret(node_input.text) if node_input.secret else node_input.text
            )
            config_command = config_commands.get(node.name)
            hosts_command = remote.Command(
                command_name(node, "hosts"),
                connection=self._connection(node, config, private_key, private_key_password),
                create=node_command(node, "hosts"),
                delete=node_command(node, "delete"),
                stdin=stdin,
                logging=remote.Logging.STDERR,
                opts=pulumi.ResourceOptions(
                    parent=self,
                    depends_on=[config_command] if config_command is not None else [],
                ),
            )
            self.commands[command_name(node, "hosts")] = hosts_command
            config_stdout: pulumi.Input[str] = (
                config_command.stdout if config_command is not None else ""
            )
            node_outputs[node.name] = pulumi.Output.all(config_stdout, hosts_command.stdout).apply(
                _report_merger(config, node, hosts_command)
            )

        hosts_toml: dict[str, Any] = {}
        for namespace in config.namespaces:
            text = render_hosts_toml(namespace)
            secret = namespace.secret or namespace.holds_credentials
            hosts_toml[namespace.name] = pulumi.Output.secret(text) if secret else text
        self.hosts_toml = pulumi.Output.from_input(hosts_toml)
        self.nodes = pulumi.Output.from_input(node_outputs)
        self.register_outputs({"hostsToml": self.hosts_toml, "nodes": self.nodes})

    @staticmethod
    def _connection(
        node: Node,
        config: MirrorConfig,
        private_key: pulumi.Input[str] | None,
        private_key_password: pulumi.Input[str] | None,
    ) -> remote.ConnectionArgs:
        proxy = None
        bastion = config.ssh.bastion
        if bastion is not None:
            proxy = remote.ProxyConnectionArgs(
                host=bastion.host,
                port=bastion.port,
                user=bastion.user,
                host_key=bastion.host_key,
                private_key=private_key,
                private_key_password=private_key_password,
            )
        return remote.ConnectionArgs(
            host=node.host,
            port=node.port,
            user=node.user,
            host_key=node.host_key,
            private_key=private_key,
            private_key_password=private_key_password,
            per_dial_timeout=config.ssh.per_dial_timeout,
            dial_error_limit=config.ssh.dial_error_limit,
            proxy=proxy,
        )
