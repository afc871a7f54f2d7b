"""The activation formula against what autograd really saves, on CPU: a bf16 model with peft LoRA runs one forward
under saved_tensors_hooks, and the distinct non-parameter storages it keeps are summed. No GPU needed; the GPU
comparison of whole peaks is bench/memory_estimate.py."""
import pytest

from autotune.estimate import Setup, _norm_bytes_per_token, layer_activation_bytes, trainable_parameters
from autotune.shapes import ModelShape, load_reference_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SMALL = {"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 600, "pad_token_id": 0, "bos_token_id": 1,
         "eos_token_id": 2}


def small_config(name):
    return {**load_reference_config(name), **SMALL}


def build(config, peft_config, dtype=torch.bfloat16):
    hf_config = transformers.AutoConfig.for_model(**config)
    hf_config.use_cache = False
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.requires_grad_(False)
    return peft.get_peft_model(model, peft_config)


def saved_activation_bytes(model, batch, seq, vocab) -> int:
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(3, vocab, (batch, seq))
    mask = torch.ones_like(ids)
    mask[::2, -seq // 8:] = 0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.base_model.model.model(input_ids=ids, attention_mask=mask)  # the decoder, without lm_head and loss
    return sum(kept.values())


@pytest.mark.parametrize("name", ["Llama-3.2-1B", "Phi-3-mini", "Gemma-2-2B"])
@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_decoder_activations_match_autograd_within_10_percent(name, dropout):
    config = small_config(name)
    model = build(config, peft.LoraConfig(r=16, target_modules="all-linear", lora_dropout=dropout))
    measured = saved_activation_bytes(model, batch=2, seq=128, vocab=config["vocab_size"])
    shape = ModelShape.from_config(config)
    setup = Setup.from_plan({"rank": 16, "dropout": dropout, "micro_batch": 2, "max_seq_len": 128,
                             "dtype": "bf16", "device": "cpu"})
    predicted = shape.num_layers * layer_activation_bytes(shape, setup) + setup.tokens * _norm_bytes_per_token(
        shape, setup)
    assert measured <= predicted <= 1.10 * measured


@pytest.mark.parametrize("name", ["Llama-3.2-1B", "Phi-3-mini", "GPT-2"])
def test_trainable_parameters_match_peft(name):
    config = small_config(name) if name != "GPT-2" else {**load_reference_config(name), "n_layer": 2, "n_embd": 64,
                                                          "n_head": 4, "vocab_size": 500, "n_positions": 128}
    shape = ModelShape.from_config(config)
    cases = {
        "lora": peft.LoraConfig(r=4, target_modules="all-linear"),
        "dora": peft.LoraConfig(r=4, target_modules="all-linear", use_dora=True),
        "ia3": peft.IA3Config(target_modules=list(shape.ia3_target_modules),
                              feedforward_modules=list(shape.ia3_feedforward_modules)),
        "prompt": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20),
        "prefix": peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20),
    }
    for method, peft_config in cases.items():
        model = build(config, peft_config, dtype=torch.float32)
        actual = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert actual == trainable_parameters(shape, {"method": method, "rank": 4, "num_virtual_tokens": 20}), method
