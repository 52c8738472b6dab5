"""Logits of a MindFormers LlamaForCausalLM for given token ids, in its own process (MindSpore's context is
process-wide). Usage: python mf_logits.py MODEL_CONFIG.json CHECKPOINT IDS.json OUT.npy

MODEL_CONFIG.json holds LlamaConfig fields (the model_config of model.json or of a run's run.yaml);
IDS.json is a list of token-id lists; OUT.npy gets float32 [prompts, positions, vocab] (shorter prompts
padded with NaN rows)."""

import json
import sys

import numpy as np


def main(config_path, checkpoint, ids_path, out):
    import mindspore as ms

    ms.set_context(mode=1, device_target="CPU")
    from mindformers import LlamaConfig, LlamaForCausalLM

    settings = {k: v for k, v in json.load(open(config_path)).items() if k not in ("type", "pet_config")}
    prompts = json.load(open(ids_path))
    length = max(len(p) for p in prompts)
    settings.update(batch_size=1, seq_length=length, use_past=False, use_flash_attention=False,
                    use_rope_slice=True, fused_rms_norm=False, compute_dtype="float32",
                    layernorm_compute_type="float32", softmax_compute_type="float32", rotary_dtype="float32",
                    param_init_type="float32", checkpoint_name_or_path="")
    model = LlamaForCausalLM(LlamaConfig(**settings))
    model.set_train(False)
    not_loaded, _ = ms.load_param_into_net(model, ms.load_checkpoint(checkpoint), strict_load=True)
    assert not not_loaded, not_loaded
    result = np.full((len(prompts), length, settings["vocab_size"]), np.nan, np.float32)
    for i, ids in enumerate(prompts):
        x = np.full((1, length), settings.get("pad_token_id") or 0, np.int32)
        x[0, : len(ids)] = ids
        logits = model(ms.Tensor(x))
        logits = (logits[0] if isinstance(logits, tuple) else logits).asnumpy().reshape(length, -1)
        result[i, : len(ids)] = logits[: len(ids)]  # causal: the padding after them changes nothing
    np.save(out, result)


if __name__ == "__main__":
    main(*sys.argv[1:])
