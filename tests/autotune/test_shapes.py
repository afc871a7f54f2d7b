import pytest

from autotune.shapes import ModelShape, load_reference_config, reference_config_names

# published parameter counts (transformers instantiates exactly these; see test_counts_match_transformers)
PARAMETERS = {
    "Llama-3.2-1B": 1_235_814_400,
    "Llama-3.1-8B": 8_030_261_248,
    "Qwen2.5-7B": 7_615_616_512,
    "Mistral-7B-v0.3": 7_248_023_552,
    "Gemma-2-2B": 2_614_341_888,
    "Phi-3-mini": 3_821_079_552,
    "GPT-2": 124_439_808,
}
LLAMA_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_every_reference_config_is_present():
    assert sorted(PARAMETERS) == reference_config_names()


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_every_family_parses_with_exact_parameter_count(name):
    shape = ModelShape.from_config(load_reference_config(name))
    assert shape.parameters == PARAMETERS[name]
    assert sum(shape.component_parameters().values()) == shape.parameters


@pytest.mark.parametrize("name,names", [
    ("Llama-3.1-8B", LLAMA_NAMES), ("Qwen2.5-7B", LLAMA_NAMES), ("Mistral-7B-v0.3", LLAMA_NAMES),
    ("Gemma-2-2B", LLAMA_NAMES), ("Phi-3-mini", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    ("GPT-2", ["c_attn", "c_proj", "c_fc"]),
])
def test_linear_module_names_per_architecture(name, names):
    assert ModelShape.from_config(load_reference_config(name)).linear_module_names == names


def test_grouped_query_attention_shapes():
    shape = ModelShape.from_config(load_reference_config("Llama-3.1-8B"))
    k_proj = next(m for m in shape.linear_modules if m.name == "k_proj")
    assert (k_proj.in_features, k_proj.out_features) == (4096, 8 * 128)
    assert shape.component_parameters()["lm_head"] == 128256 * 4096


def test_gemma_uses_its_explicit_head_dim_and_eager_attention():
    shape = ModelShape.from_config(load_reference_config("Gemma-2-2B"))
    q_proj = next(m for m in shape.linear_modules if m.name == "q_proj")
    assert q_proj.out_features == 8 * 256 != shape.hidden_size
    assert shape.norms_per_layer == 4
    assert shape.default_attention == "eager"
    assert shape.tie_word_embeddings


def test_phi3_fused_projections():
    shape = ModelShape.from_config(load_reference_config("Phi-3-mini"))
    sizes = {m.name: (m.in_features, m.out_features) for m in shape.linear_modules}
    assert sizes["qkv_proj"] == (3072, 3 * 3072)
    assert sizes["gate_up_proj"] == (3072, 2 * 8192)


def test_gpt2_two_c_proj_layers_share_a_name():
    shape = ModelShape.from_config(load_reference_config("GPT-2"))
    c_proj = [m for m in shape.linear_modules if m.name == "c_proj"]
    assert [(m.in_features, m.out_features) for m in c_proj] == [(768, 768), (3072, 768)]
    assert [m.path for m in shape.modules_for(["mlp.c_proj"])] == ["mlp.c_proj"]
    assert shape.position_embeddings == 1024 * 768


def test_qwen2_has_qkv_biases():
    shape = ModelShape.from_config(load_reference_config("Qwen2.5-7B"))
    assert [m.name for m in shape.linear_modules if m.bias] == ["q_proj", "k_proj", "v_proj"]


def test_generic_fallback_reads_llama_fields():
    config = {"model_type": "somethingnew", "hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
              "num_key_value_heads": 2, "intermediate_size": 1024, "vocab_size": 1000, "tie_word_embeddings": True}
    shape = ModelShape.from_config(config)
    assert shape.family == "generic"
    per_layer = 512 * 512 * 2 + 512 * 128 * 2 + 3 * 512 * 1024 + 2 * 512
    assert shape.parameters == 1000 * 512 + 4 * per_layer + 512


def test_nested_text_config_is_read():
    inner = load_reference_config("Llama-3.2-1B")
    shape = ModelShape.from_config({"model_type": "llava", "text_config": inner})
    assert shape.hidden_size == 2048


def test_gpt2_defaults_n_inner_to_four_times_hidden():
    config = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128, "vocab_size": 100}
    assert ModelShape.from_config(config).intermediate_size == 256


@pytest.mark.parametrize("missing", ["hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"])
def test_missing_field_is_named(missing):
    config = dict(load_reference_config("Llama-3.1-8B"))
    del config[missing]
    with pytest.raises(ValueError, match=missing):
        ModelShape.from_config(config)


def test_nonsense_is_rejected():
    with pytest.raises(ValueError):
        ModelShape.from_config("not a dict")
    with pytest.raises(ValueError, match="n_embd"):
        ModelShape.from_config({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="positive"):
        ModelShape.from_config({**load_reference_config("Llama-3.1-8B"), "hidden_size": -1})


def test_unknown_target_module_lists_the_valid_ones():
    shape = ModelShape.from_config(load_reference_config("Phi-3-mini"))
    with pytest.raises(ValueError, match="qkv_proj"):
        shape.modules_for(["q_proj"])


def test_counts_match_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    for name, expected in PARAMETERS.items():
        config = transformers.AutoConfig.for_model(**load_reference_config(name))
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        assert sum(p.numel() for p in model.parameters()) == expected, name
        linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D")}
        assert set(ModelShape.from_config(load_reference_config(name)).linear_module_names) == linear - {"lm_head"}
