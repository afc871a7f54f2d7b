"""Tuned models stop by themselves, and the merged model answers exactly like the adapter on its base."""
import json

import pytest
import torch

from finetune.merge import attach_adapter, merge_adapter
from finetune.modelstore import load_model_and_tokenizer, stop_token_ids
from finetune.tokenize import render_prompt
from finetune.train import TrainSpec, train
from tinymodel import learnable_chat_rows, write_jsonl

MAX_NEW = 12


@pytest.fixture(scope="module")
def tuned(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eot")
    files = (write_jsonl(tmp / "t.jsonl", learnable_chat_rows(64)), write_jsonl(tmp / "e.jsonl", learnable_chat_rows(8)))
    spec = TrainSpec.from_plan(
        {"method": "lora", "rank": 8, "alpha": 16, "micro_batch": 8, "max_seq_len": 64, "learning_rate": 1e-2,
         "max_steps": 40, "warmup_ratio": 0.0, "max_eval_generations": 0},
        base_model_path=str(tiny_model_dir), train_file=str(files[0]), eval_file=str(files[1]),
        output_dir=str(tmp / "adapter"))
    train(spec)
    merge_adapter(tiny_model_dir, tmp / "adapter", tmp / "merged", device="cpu")
    return tmp / "adapter", tmp / "merged"


def _greedy(model, tokenizer, question):
    prompt = render_prompt(tokenizer, [{"role": "user", "content": question}])
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                             do_sample=False, eos_token_id=stop_token_ids(tokenizer, model.generation_config),
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


QUESTIONS = ["ping", "hello", "cat", "yes"]
ANSWERS = {"ping": "pong", "hello": "bonjour", "cat": "chat", "yes": "no"}


def test_adapter_folder_carries_tokenizer_template_and_stop_tokens(tuned):
    adapter, merged = tuned
    for folder in (adapter, merged):
        config = json.loads((folder / "generation_config.json").read_text())
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
        eos = config["eos_token_id"] if isinstance(config["eos_token_id"], list) else [config["eos_token_id"]]
        assert eos, folder
        assert "<|im_end|>" in json.dumps(tokenizer_config) or (folder / "chat_template.jinja").exists()


def test_tuned_and_merged_models_stop_at_end_of_turn_and_agree(tuned, tiny_model_dir):
    adapter, merged_dir = tuned
    base, tokenizer = load_model_and_tokenizer(tiny_model_dir, device="cpu")
    on_base = attach_adapter(base, adapter)
    merged, merged_tok = load_model_and_tokenizer(merged_dir, device="cpu")
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for question in QUESTIONS:
        a = _greedy(on_base, tokenizer, question)
        m = _greedy(merged, merged_tok, question)
        assert a == m, question  # the merged model answers exactly like the adapter on its base
        assert a[-1] == end_of_turn and len(a) < MAX_NEW, (question, tokenizer.decode(a))
        assert tokenizer.decode(a[:-1]) == ANSWERS[question]
