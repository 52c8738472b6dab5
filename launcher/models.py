"""The models the launcher ships base configs for, and which MindFormers releases can run each one.

A model's classes are either in MindFormers' own package (`mindformers.models`, registered when
MindFormers is imported) or in a `research/<model>` folder of the MindFormers source tree, which no
wheel ships and which registers its classes only when its modules are imported (research/baichuan2/
run_baichuan2.py does `import baichuan2_7b` before it builds the Trainer). For the second kind the
entrypoint imports those modules from the job's MindFormers source checkout before it builds anything.

Which releases carry what, from the mindspore-lab/mindformers tags:
- research/baichuan2 (Baichuan7BV2ForCausalLM in baichuan2_7b.py, Baichuan2Tokenizer in
  baichuan2_tokenizer.py) exists from r1.0 to v1.3.2 and is gone from v1.5.0 on (`git ls-tree v1.5.0
  research/`); no 1.4 release was published, only betas.
- LlamaForCausalLM / LlamaConfig are in-tree in every release from 1.0 to 1.8.0; LlamaConfig has
  qkv_has_bias from v1.0.2 on (mindformers/models/llama/llama_config.py), which Qwen1.5 needs.
- Qwen1.5-7B: the first fine-tune config is v1.2.0 research/qwen1_5/finetune_qwen1_5_7b.yaml, which
  already uses the in-tree LlamaForCausalLM with qkv_has_bias; research/qwen1_5 is gone from v1.6.0, and
  the launcher's fine-tune builds no tokenizer, so nothing of it is needed.
- The tiny CPU model's configs are written for MindFormers 1.8 (they are trained on 1.8.0 here).
"""

from __future__ import annotations

from dataclasses import dataclass

# The MindFormers release the shipped 1.8 configs are written for and the launcher installs: assumed for
# a job that does not say which release its ranks run.
TARGET_RELEASE = "1.8.0"

# MindFormers' scripts/msrun_launcher.sh first ships in v1.1.0 (MindSpore 2.3, which brought msrun);
# 1.0.x starts ranks from a rank table (scripts/run_distribute.sh, research/run_singlenode.sh).
MSRUN_FROM = "1.1"
# msrun_launcher.sh passes --bind_core=True from v1.6.0 on (msrun of MindSpore 2.7 has the flag).
BIND_CORE_FROM = "1.6"

# Environment variable the plan sets for research models: "DIR:module,module" (see entrypoints/finetune.py).
MODULES_ENV = "LAUNCHER_MODEL_MODULES"


@dataclass(frozen=True)
class Model:
    methods: tuple[str, ...]  # a base config ships under configs/mindformers/<model>/<method>.yaml
    lowest: str  # the first MindFormers release line that can run it
    first_unsupported: str | None = None  # the first release line that cannot, if any
    research: str | None = None  # folder of the MindFormers source tree that holds its classes
    modules: tuple[str, ...] = ()  # modules of that folder that register the classes

    def carried_by(self, version: str) -> bool:
        line = release_line(version)
        if line < release_line(self.lowest):
            return False
        return self.first_unsupported is None or line < release_line(self.first_unsupported)

    @property
    def releases(self) -> str:
        """The supported releases in words, for messages."""
        if self.first_unsupported is None:
            return f"MindFormers {self.lowest} or newer"
        return f"MindFormers {self.lowest} up to (not including) {self.first_unsupported}"


MODELS: dict[str, Model] = {
    "tiny_llama": Model(methods=("lora", "full"), lowest="1.8"),
    "llama2_7b": Model(methods=("lora",), lowest="1.0"),
    "baichuan2_7b": Model(methods=("lora",), lowest="1.0", first_unsupported="1.5", research="research/baichuan2",
                          modules=("baichuan2_7b", "baichuan2_tokenizer")),
    "qwen1_5_7b": Model(methods=("lora", "full"), lowest="1.2"),
}


# A model made by `launcher model import` (a job's `model: DIR`): MindFormers' in-tree LlamaForCausalLM,
# trained with the shipped 1.8 base configs.
IMPORTED = Model(methods=("lora", "full"), lowest="1.8")


def model_spec(model: str) -> Model:
    """What the launcher knows of a job's model: a shipped one, or an imported directory."""
    from launcher.weights.imported import is_imported

    return IMPORTED if model not in MODELS and is_imported(model) else MODELS[model]


def release_line(version: str) -> tuple[int, int]:
    """'1.3.2' -> (1, 3); '1.0' -> (1, 0). Raises ValueError for anything else."""
    parts = version.split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
        raise ValueError(f"'{version}' is not a MindFormers version such as 1.8.0")
    return int(parts[0]), int(parts[1])


def modules_env(model: str, source: str) -> str:
    """The LAUNCHER_MODEL_MODULES value of a research model whose MindFormers checkout is `source`."""
    spec = MODELS[model]
    return f"{source.rstrip('/')}/{spec.research}:{','.join(spec.modules)}"
