"""Every registered method answers every question the platform asks it (finetune/methods/), and no code outside
the methods package decides by comparing a method's name with a string."""
import ast
from pathlib import Path

import pytest

from autotune.estimate import Setup, estimate
from autotune.select import select
from autotune.shapes import ModelShape, load_reference_config
from finetune.data.registry import TRAINING_SCHEMAS
from finetune.errors import TunedeckError
from finetune.methods import (
    AUTO,
    METHODS,
    Method,
    auto_method_for_schema,
    auto_methods,
    find_method,
    get_method,
    merge_problem,
    method_for_peft_type,
    method_names,
    methods_where,
    register_method,
    schema_problem,
    wrap_for_training,
)

ROOT = Path(__file__).resolve().parents[2]
ALL = method_names()
GPU = {"gpus": [{"index": 0, "name": "Test GPU", "free_bytes": 80 * 2**30, "bf16": True,
                 "compute_capability": "9.0"}]}
EXAMPLES = {  # one normalised example of each training schema (docs/internals.md "Normalised examples")
    "chat": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    "text": {"text": "Some text."},
    "preference": {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello", "rejected": "Go away"},
    "kto": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
            "label": True},
}


def test_the_built_in_methods_are_registered_in_order():
    assert ALL == ["lora", "qlora", "dora", "ia3", "prefix", "prompt", "adapter", "dpo", "kto", "orpo"]
    assert all(isinstance(m, Method) for m in METHODS.values())


def test_an_unknown_method_gets_a_clear_error_naming_the_known_ones():
    with pytest.raises(TunedeckError) as error:
        get_method("orpo2")
    assert "Unknown method 'orpo2'" in str(error.value)
    assert all(name in str(error.value) for name in ALL)
    assert find_method("orpo2") is None
    assert get_method(" LoRA ").name == "lora"


def test_a_name_is_registered_once_and_auto_is_not_a_method():
    with pytest.raises(ValueError, match="already registered"):
        register_method(Method("lora", "LoRA again", 1e-4, "a copy"))
    with pytest.raises(ValueError, match="already registered"):
        register_method(Method(AUTO, "Auto", 1e-4, "the planner's choice"))
    assert AUTO not in ALL
    with pytest.raises(TypeError, match="no trait"):
        methods_where(colour="blue")


@pytest.mark.parametrize("name", ALL)
def test_traits_and_plan_defaults_have_reasons(name):
    method = get_method(name)
    assert method.label and method.learning_rate > 0 and method.learning_rate_why
    plan = select(GPU, load_reference_config("Llama-3.2-1B"), {"rows": 2000}, {"method": name})
    assert plan["method"] == name
    assert plan["learning_rate"] == method.learning_rate
    assert any(method.learning_rate_why in r for r in plan["reasons"])
    assert any(r.startswith(f"{method.label}, as requested") for r in plan["reasons"])
    assert any(r.startswith("Target modules") for r in plan["reasons"])
    base = {"dropout": 0.05, "num_virtual_tokens": 20, "adapter_bottleneck": 64}
    for key, value in method.plan_settings(base).items():
        assert plan[key] == value
    assert bool(plan["target_modules"]) == method.adapts_layers
    assert plan["fused_cross_entropy"] == method.can_pack


@pytest.mark.parametrize("name", ALL)
def test_estimator_terms_are_numbers(name):
    method = get_method(name)
    shape = ModelShape.from_config(load_reference_config("Llama-3.2-1B"))
    setup = Setup.from_plan({"method": name, "micro_batch": 2, "max_seq_len": 256})
    assert method.trainable_parameters(shape, setup) > 0
    for term in (method.activation_bytes_per_token(shape, setup), method.weight_temporaries(shape, setup),
                 method.input_tokens(setup), method.prefix_tokens(setup)):
        assert isinstance(term, (int, float)) and term >= 0
    block = setup.compute_bytes * (2 * shape.hidden_size + 2 * shape.intermediate_size)  # the base block's
    assert method.backward_bytes_per_token(shape, setup, block) > 0
    assert method.trainable_bytes(2) in (2, 4)
    assert bool(method.adapted_modules(shape, setup)) == method.adapts_layers
    memory = estimate(shape, {"method": name, "micro_batch": 2, "max_seq_len": 256})
    assert memory["total_bytes"] > 0 and all(v >= 0 for v in memory["breakdown"].values())


@pytest.mark.parametrize("name", ALL)
def test_the_peft_config_or_wrapper_builds_on_the_tiny_model(name, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    method = get_method(name)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plan = {"method": name, "rank": 4, "num_virtual_tokens": 4, "adapter_bottleneck": 8}
    config = method.peft_config(plan)
    assert (config is not None) == method.peft
    wrapped = wrap_for_training(model, plan)
    trained = [p for p in wrapped.parameters() if p.requires_grad]
    assert trained and all(p.is_floating_point() for p in trained)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert wrapped(input_ids=ids).logits.shape[-1] == model.config.vocab_size


@pytest.mark.parametrize("name", ALL)
def test_accepts_schema_agrees_with_the_traits_and_explains_a_refusal(name):
    method = get_method(name)
    assert method.schemas and set(method.schemas) <= set(TRAINING_SCHEMAS)
    assert method.accepts_schema("preference") == method.paired
    assert method.accepts_schema("chat") == method.accepts_schema("text") == (not method.preference)
    for schema in TRAINING_SCHEMAS:
        problem = schema_problem(name, schema, f"my-{schema}-layout")
        assert (problem is None) == method.accepts_schema(schema)
        assert problem is None or problem.endswith(".") and len(problem) > 30
        refused = method.example_problem(EXAMPLES[schema])
        if method.accepts_schema(schema):
            assert refused is None
        assert refused is None or refused.endswith(".")
    assert schema_problem(AUTO, "kto", "kto") is None


def test_every_schema_trains_with_some_method_and_auto_picks_its_own():
    for schema in TRAINING_SCHEMAS:
        assert [m for m in METHODS.values() if m.accepts_schema(schema)]
    assert auto_method_for_schema("preference") == "dpo"
    assert auto_method_for_schema("kto") == "kto"
    assert auto_method_for_schema("chat") == AUTO
    assert [m.name for m in auto_methods()] == ["lora", "qlora"]
    assert [m.name for m in auto_methods("cpu")] == ["lora"]
    assert get_method("kto").example_fields(EXAMPLES["kto"]) == {"desirable": True}


@pytest.mark.parametrize("name", ALL)
def test_merge_answers_agree(name):
    method = get_method(name)
    if method.can_merge:
        assert merge_problem(name, "LORA") is None
        assert not method.merge_refusal
    else:
        assert method.merge_refusal and method.merge_refusal in merge_problem(name, "")
    for peft_type in method.adapter_peft_types:
        found = method_for_peft_type(peft_type, {"use_dora": getattr(method, "use_dora", False)})
        assert found is method
    assert not (method.serves_as_lora and not method.lora_family)
    assert not method.oom_fallback or get_method(method.oom_fallback).quantized_base
    assert merge_problem("unknown", "VERA").startswith("Merging 'unknown' adapters is not supported")


# ------------------------------------------------------------------------------------------------ the AST check

SCANNED = ("autotune", "finetune", "jobs", "tunedeck", "serving", "bench/memory_estimate.py")
NOT_SCANNED = {
    "finetune/methods",  # the methods themselves
}


def _names_a_method(node) -> bool:
    """method, spec.method, plan["method"], plan.get("method"): an expression holding a method's name."""
    if isinstance(node, ast.Name):
        return "method" in node.id.lower()
    if isinstance(node, ast.Attribute):
        return "method" in node.attr.lower()
    if isinstance(node, ast.Subscript):
        return isinstance(node.slice, ast.Constant) and node.slice.value == "method"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
        return bool(node.args) and isinstance(node.args[0], ast.Constant) and node.args[0].value == "method"
    return False


def _method_literals(node) -> list[str]:
    if isinstance(node, ast.Constant):
        return [node.value] if node.value in ALL else []
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [n.value for n in node.elts if isinstance(n, ast.Constant) and n.value in ALL]
    return []


def name_comparisons(tree) -> list[tuple[int, str]]:
    """(line, what) for each comparison of a method with a method name, and each dict keyed by method names."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_names_a_method(s) for s in sides):
                literals = [lit for s in sides for lit in _method_literals(s)]
                if literals:
                    found.append((node.lineno, f"compares a method with {', '.join(literals)}"))
        elif isinstance(node, ast.Dict):
            keys = [k.value for k in node.keys if isinstance(k, ast.Constant) and k.value in ALL]
            if len(keys) >= 2:
                found.append((node.lineno, f"a dict keyed by methods {', '.join(keys)}"))
    return found


def test_the_checker_finds_name_comparisons():
    source = ('if plan["method"] == "qlora": pass\nif spec.method in ("lora", "dora"): pass\n'
              'x = {"dpo": 1, "kto": 2}\nif method == "auto": pass\nif request.method == "POST": pass\n'
              'if plan.get("method") != "prefix": pass\n')
    assert [line for line, _ in name_comparisons(ast.parse(source))] == [1, 2, 3, 6]


def test_no_code_outside_the_methods_package_compares_method_names():
    offenders = []
    for top in SCANNED:
        for path in [ROOT / top] if top.endswith(".py") else sorted((ROOT / top).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if "migrations" in relative or any(relative == s or relative.startswith(s + "/") for s in NOT_SCANNED):
                continue
            offenders += [f"{relative}:{line}: {what}"
                          for line, what in name_comparisons(ast.parse(path.read_text(encoding="utf-8")))]
    assert offenders == [], "ask the method (finetune.methods.get_method(name)) instead:\n" + "\n".join(offenders)
