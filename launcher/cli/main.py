"""The command line: the `launcher` group. Each command lives in a module of launcher/cli/ and is
imported only when it runs, so a quick command (`launcher runs`) does not pay for the planner's imports.

These modules are the only places that print errors or exit."""

from __future__ import annotations

import importlib

import click

# command name -> "module:attribute" of its click command, in the order `launcher --help` lists them.
COMMANDS = {
    "render": "launcher.cli.lifecycle:render",
    "up": "launcher.cli.lifecycle:up",
    "status": "launcher.cli.lifecycle:status",
    "logs": "launcher.cli.lifecycle:logs",
    "gather": "launcher.cli.lifecycle:gather_cmd",
    "down": "launcher.cli.lifecycle:down",
    "resume": "launcher.cli.lifecycle:resume",
    "runs": "launcher.cli.runs:runs_cmd",
    "compare": "launcher.cli.runs:compare_cmd",
    "dataset": "launcher.cli.lifecycle:dataset",
    "data": "launcher.cli.data:data_cmd",
    "model": "launcher.cli.model:model_cmd",
    "ckpt": "launcher.cli.ckpt:ckpt_cmd",
    "predict": "launcher.cli.predict:predict_cmd",
    "ranktable": "launcher.cli.ranktable:ranktable_cmd",
    "preflight": "launcher.cli.ranktable:preflight_cmd",
    "image": "launcher.cli.image:image",
    "k8s": "launcher.cli.k8s:k8s_cmd",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attribute = target.split(":")
        return getattr(importlib.import_module(module), attribute)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="launcher")
def main() -> None:
    """Launch MindSpore/MindFormers fine-tunes (LoRA or full) from one job file.

    \b
    launcher render JOB -o DIR    write every artifact for review
    launcher up JOB               start the job, watch it, gather it into runs/<run-id>/
    launcher status|logs|gather|down RUN
    launcher resume RUN           the next attempt of a failed run, from its last verified checkpoint
    launcher runs                 every run, one line each; compare RUN RUN... side by side
    launcher dataset tiny PATH    make the demo dataset for the tiny CPU model
    launcher data prepare JOB     tokenize the job's data: section into a MindRecord
    launcher model import SRC -o DIR   a GGUF file or Hugging Face directory to a MindFormers model
    launcher k8s role             the Role a service account needs to run jobs on Kubernetes
    """


if __name__ == "__main__":
    main()
