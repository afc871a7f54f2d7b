"""finetune.chat_templates: the templates a user may choose for a base model without one (issue 34)."""
import pytest

from finetune.chat_templates import CHAT_TEMPLATES, apply_chat_template_choice, chat_template_choice
from finetune.tokenize import chat_text_and_spans

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]


@pytest.fixture
def bare_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = None
    return tokenizer


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_a_chosen_template_renders_chats_with_the_answer_found(bare_tokenizer, name):
    assert apply_chat_template_choice(bare_tokenizer, name)
    text, spans = chat_text_and_spans(bare_tokenizer, CHAT)
    assert len(spans) == 1 and "Hello there" in text[spans[0][0]:spans[0][1]]
    assert "Hi" in text[:spans[0][0]], "the user's turn comes first and is not learned"


def test_zephyr_ends_answers_with_the_models_own_eos(bare_tokenizer):
    apply_chat_template_choice(bare_tokenizer, "zephyr")
    text, spans = chat_text_and_spans(bare_tokenizer, CHAT)
    assert text[spans[0][0]:spans[0][1]].endswith(bare_tokenizer.eos_token)


def test_a_models_own_template_is_kept(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    own = tokenizer.chat_template
    assert not apply_chat_template_choice(tokenizer, "llama3") and tokenizer.chat_template == own


def test_choices_in_the_users_terms():
    assert chat_template_choice(" ChatML ") == "chatml" and chat_template_choice("") == ""
    with pytest.raises(ValueError, match="Unknown chat template 'alpaca'; choose one of"):
        chat_template_choice("alpaca")
