"""A quick generation check of a fine-tuned checkpoint with the MindFormers text-generation pipeline.

Run by `launcher predict` in its own process (MindSpore's context is process-wide and MindFormers logs
to the current directory), so nothing of it leaks into the launcher. Usage:

    python predict.py REQUEST.json

REQUEST.json: {"config": run.yaml, "checkpoint": .ckpt, "tokenizer": tokenizer.model or a directory with
vocab.json and merges.txt, "prompts": [...], "max_new_tokens": N, "device": "cpu"|"ascend", "result": out.json}.
The result file gets {"outputs": [{"prompt", "text"}], "checkpoint", "use_past"}.
"""

import json
import os
import sys
from pathlib import Path

import yaml

LORA_MARK = "mindpet_delta_lora"


def _tokenizer(path):
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "vocab.json")):
        # MindFormers 1.8 ships no Qwen2 tokenizer class; wrap the same byte-level BPE that
        # `launcher data prepare` tokenized the dataset with.
        from mindformers import PreTrainedTokenizerFast

        from launcher.data.tokenization import ByteLevelBpeTokenizer

        bpe = ByteLevelBpeTokenizer(Path(path)).tok
        return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                       pad_token="<|endoftext|>")
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.model")
    from mindformers import LlamaTokenizer

    # Llama2 and Baichuan2 both ship a sentencepiece model; LlamaTokenizer reads any of them.
    return LlamaTokenizer(vocab_file=path)


def _model(model_section, params, use_past):
    from mindformers.pet import get_pet_model
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

    settings = dict(model_section["model_config"])
    config_cls = MindFormerRegister.get_cls(MindFormerModuleType.CONFIG, settings.pop("type"))
    pet_config = settings.pop("pet_config", None)
    settings.update(batch_size=1, use_past=use_past, checkpoint_name_or_path="")
    model_cls = MindFormerRegister.get_cls(MindFormerModuleType.MODELS, model_section["arch"]["type"])
    model = model_cls(config_cls(**settings))
    # A checkpoint with the adapter still separate needs the LoRA cells; a folded one is a plain model.
    if pet_config and any(LORA_MARK in name for name in params):
        model = get_pet_model(model, pet_config)
    return model


def _load_weights(model, params):
    import mindspore as ms

    not_loaded, _ = ms.load_param_into_net(model, params, strict_load=False)
    # Without this check a wrong checkpoint would "predict" from random weights.
    missing = [name for name in not_loaded if "key_past" not in name and "value_past" not in name]
    if missing:
        raise SystemExit("the checkpoint does not fit the model; missing: " + ", ".join(missing[:5]))


def _use_cpu_argmax(model):
    """Greedy search picks tokens with mint.argmax, which has no CPU kernel in MindSpore 2.7; use ops.Argmax."""
    from mindspore import ops

    model.argmax = lambda logits, axis: ops.Argmax(axis=axis)(logits)


def main(request_path):
    with open(request_path) as f:
        request = json.load(f)
    import mindspore as ms
    from mindformers import pipeline

    on_cpu = request["device"] == "cpu"
    ms.set_context(mode=0, device_target="CPU" if on_cpu else "Ascend")
    with open(request["config"]) as f:
        config = yaml.safe_load(f)
    params = ms.load_checkpoint(request["checkpoint"])
    # Incremental decoding (use_past) runs Ascend-only kernels (ApplyRotaryPosEmb, paged attention); on the
    # CPU the pipeline recomputes the whole sequence each step instead.
    use_past = not on_cpu
    model = _model(config["model"], params, use_past)
    _load_weights(model, params)
    if on_cpu:
        _use_cpu_argmax(model)
    model.set_train(False)
    tokenizer = _tokenizer(request["tokenizer"])
    generator = pipeline(task="text_generation", model=model, tokenizer=tokenizer)
    # Stop at the tokenizer's end of text, which the model config's default id need not match.
    stop = {"eos_token_id": [tokenizer.eos_token_id]} if tokenizer.eos_token_id is not None else {}
    outputs = []
    for prompt in request["prompts"]:
        result = generator(prompt, max_new_tokens=request["max_new_tokens"], do_sample=False, **stop)
        outputs.append({"prompt": prompt, "text": result[0]["text_generation_text"][0]})
    with open(request["result"] + ".tmp", "w") as f:
        json.dump({"outputs": outputs, "checkpoint": request["checkpoint"], "use_past": use_past}, f, indent=2)
    os.replace(request["result"] + ".tmp", request["result"])


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: predict.py REQUEST.json")
    main(sys.argv[1])
