"""nexus-mirror: containerd nodes pulling through Sonatype Nexus registry proxies."""

import pulumi

from components.config import parse_config
from components.kubernetes.component import KubernetesMirror
from components.mirror import NexusMirror
from components.program_config import read_program_config
from components.validation import ConfigError

values, secret_names = read_program_config()
try:
    mirror_config = parse_config(values, secret_names)
except ConfigError as error:
    raise pulumi.RunError(str(error)) from None

mirror: NexusMirror | KubernetesMirror
if mirror_config.delivery == "kubernetes":
    mirror = KubernetesMirror("nexus-mirror", mirror_config)
    pulumi.export("kubernetes", mirror.kubernetes)
else:
    config = pulumi.Config("nexus-mirror")
    mirror = NexusMirror(
        "nexus-mirror",
        mirror_config,
        private_key=config.get_secret("sshPrivateKey"),
        private_key_password=config.get_secret("sshPrivateKeyPassword"),
    )
pulumi.export("hostsToml", mirror.hosts_toml)
pulumi.export("nodes", mirror.nodes)
