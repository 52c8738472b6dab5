"""`launcher k8s role`: the Role the Kubernetes backend needs, for a cluster admin to apply."""

from __future__ import annotations

import click
import yaml

from launcher.k8s_rbac import role_objects


@click.group("k8s")
def k8s_cmd() -> None:
    """Kubernetes helpers."""


@k8s_cmd.command("role")
@click.option("-n", "--namespace", default="default", show_default=True, help="where the jobs run")
@click.option("--service-account", default="launcher", show_default=True,
              help="who runs the launcher (the RoleBinding's subject)")
@click.option("--name", default="launcher", show_default=True, help="name of the Role and RoleBinding")
def role(namespace: str, service_account: str, name: str) -> None:
    """Print the Role and RoleBinding that let SERVICE_ACCOUNT run `launcher up`, `status`, `logs`,
    `gather` and `down` in NAMESPACE, and nothing else. Apply them with `kubectl apply -f -`."""
    click.echo(yaml.safe_dump_all(role_objects(namespace, service_account, name), sort_keys=False), nl=False)
