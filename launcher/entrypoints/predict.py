"""A quick generation check of a fine-tuned checkpoint with MindFormers' tokenizer and generate().

Run by `launcher predict` in its own process (MindSpore's context is process-wide and MindFormers logs
to the current directory), so nothing of it leaks into the launcher. Usage:

    python predict.py REQUEST.json

REQUEST.json: {"config": run.yaml, "checkpoint": .ckpt, "tokenizer": tokenizer.model or a directory
(tokenizer.json + tokenizer_config.json, or vocab.json + merges.txt), "prompts": [...], "bos_id": id or null,
"stop_ids": [...], "max_new_tokens": N, "device": "cpu"|"ascend", "result": out.json}.
The result file gets {"outputs": [{"prompt", "text", "answer"}], "checkpoint", "use_past"}: text is the
whole sequence without special tokens, answer what follows the prompt, up to the first stop id.
"""

import json
import os
import sys
from pathlib import Path

import yaml

LORA_MARK = "mindpet_delta_lora"


def _tokenizer(path):
    from launcher.data.tokenizer import HfTokenizer, load_tokenizer

    ours = load_tokenizer(Path(path))
    if isinstance(ours, HfTokenizer):
        # MindFormers 1.8 ships no Qwen2 tokenizer class; wrap the same tokenizers.Tokenizer that
        # `launcher data prepare` tokenized the dataset with, with its end and pad tokens.
        from mindformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_object=ours.tok, eos_token=ours.token(ours.eos),
                                       pad_token=ours.token(ours.pad), bos_token=ours.token(ours.bos))
    from mindformers import LlamaTokenizer

    # Llama2 and Baichuan2 both ship a sentencepiece model; LlamaTokenizer reads any of them.
    return LlamaTokenizer(vocab_file=str(ours.path))


def answer_ids(sequence, prompt_length, stop_ids):
    """The generated ids after the prompt, up to (without) the first stop id."""
    generated = list(sequence[prompt_length:])
    ends = [i for i, t in enumerate(generated) if t in stop_ids]
    return generated[:ends[0]] if ends else generated


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

    on_cpu = request["device"] == "cpu"
    ms.set_context(mode=0, device_target="CPU" if on_cpu else "Ascend")
    with open(request["config"]) as f:
        config = yaml.safe_load(f)
    params = ms.load_checkpoint(request["checkpoint"])
    # Incremental decoding (use_past) runs Ascend-only kernels (ApplyRotaryPosEmb, paged attention); on the
    # CPU generate() recomputes the whole sequence each step instead.
    use_past = not on_cpu
    model = _model(config["model"], params, use_past)
    _load_weights(model, params)
    if on_cpu:
        _use_cpu_argmax(model)
    model.set_train(False)
    tokenizer = _tokenizer(request["tokenizer"])
    # generate() rather than the text-generation pipeline, which decodes without special tokens: the ids
    # are needed to cut the answer at the template's end token. The prompt starts as `launcher data
    # prepare` starts a record: with BOS only where it puts one.
    bos = [] if request["bos_id"] is None else [request["bos_id"]]
    stop = request["stop_ids"]
    outputs = []
    for prompt in request["prompts"]:
        ids = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        [sequence] = model.generate(ids, max_new_tokens=request["max_new_tokens"], do_sample=False,
                                    eos_token_id=stop)
        sequence = [int(t) for t in sequence]
        answer = answer_ids(sequence, len(ids), stop)
        outputs.append({"prompt": prompt, "text": tokenizer.decode(sequence, skip_special_tokens=True),
                        "answer": tokenizer.decode(answer, skip_special_tokens=True).strip()})
    with open(request["result"] + ".tmp", "w") as f:
        json.dump({"outputs": outputs, "checkpoint": request["checkpoint"], "use_past": use_past}, f, indent=2)
    os.replace(request["result"] + ".tmp", request["result"])


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: predict.py REQUEST.json")
    main(sys.argv[1])
